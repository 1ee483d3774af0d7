"""ROC, TAR at FAR (1:1 verification) and rank-k / TPIR at FPIR (1:N identification).

`roc_curve` re-states sklearn.metrics.roc_curve (drop_intermediate=True, its default, which
eval_ijbc.py uses): thresholds at the distinct scores in decreasing order, points that lie
on a straight segment between their neighbours dropped, then (0, 0) prepended. The TAR at
each FAR is read as eval_ijbc.py reads it: the ROC point whose FPR is nearest the FAR,
ties to the larger TPR. The 1:N numbers are ijb_1n.py's definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # eval_ijbc.py's columns
FPIRS = (0.01, 0.1)  # ijb_1n.py's
RANKS = (1, 5, 10)


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with sklearn.metrics.roc_curve's semantics; labels 0/1, both
    present. thresholds[0] is +inf (sklearn >= 1.3)."""
    y = np.asarray(labels) == 1
    s = np.asarray(scores, np.float64)
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y, dtype=np.float64)[last_of_value]
    fps = 1 + last_of_value - tps
    thresholds = s[last_of_value]
    if drop_intermediate and len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the curve by the trapezoidal rule (sklearn.metrics.auc)."""
    return float(np.trapezoid(tpr, fpr))


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[float, float]:
    """{far: tpr of the ROC point nearest far}, ties to the larger TPR (eval_ijbc.py flips
    the curve and takes the first minimum)."""
    fpr_desc, tpr_desc = fpr[::-1], tpr[::-1]
    return {far: float(tpr_desc[int(np.argmin(np.abs(fpr_desc - far)))]) for far in fars}


@dataclass(frozen=True)
class Verification:
    tar: dict[float, float]  # FAR -> TAR
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    positives: int
    negatives: int


def verification(labels: np.ndarray, scores: np.ndarray, fars=FARS) -> Verification:
    fpr, tpr, _ = roc_curve(labels, scores)
    positives = int((np.asarray(labels) == 1).sum())
    return Verification(
        tar_at_far(fpr, tpr, fars), auc(fpr, tpr), fpr, tpr, positives, len(labels) - positives
    )


@dataclass(frozen=True)
class IdentificationResult:
    rank: dict[int, float]  # k -> fraction of probes whose mate is among the top k
    tpir: dict[float, float]  # FPIR -> TPIR
    thresholds: dict[float, float]  # FPIR -> score threshold
    probes: int
    gallery: int


class MateError(ValueError):
    """A probe subject without exactly one gallery template."""

    def __init__(self, subject: int, count: int):
        super().__init__(
            f"subject {subject} has {count} gallery templates; the 1:N protocol needs exactly one"
        )
        self.subject = subject


def gallery_index(probe_subjects: np.ndarray, gallery_subjects: np.ndarray) -> np.ndarray:
    """Row of each probe's mate in the gallery; MateError unless exactly one
    (ijb_1n.py's gen_mask)."""
    order = np.argsort(gallery_subjects, kind="stable")
    sorted_ids = gallery_subjects[order]
    left = np.searchsorted(sorted_ids, probe_subjects, "left")
    right = np.searchsorted(sorted_ids, probe_subjects, "right")
    bad = (right - left) != 1
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MateError(int(probe_subjects[i]), int(right[i] - left[i]))
    return order[left]


def identification(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks=RANKS,
    fpirs=FPIRS,
    chunk: int = 2048,
) -> IdentificationResult:
    """ijb_1n.py's evaluation: rank-k hit rates over the similarity matrix (ties ordered by
    gallery row, as a stable sort); for each FPIR, the threshold is the k-th largest
    non-mate similarity with k = ceil(probes * FPIR), and TPIR the fraction of mate
    similarities above it."""
    mate = gallery_index(probe_subjects, gallery_subjects)
    q = len(probe_feats)
    need = [math.ceil(q * f) for f in fpirs]
    keep = max(need)
    positions = np.empty(q, np.int64)
    mates = np.empty(q, np.float64)
    top_negatives = []
    columns = np.arange(len(gallery_feats))
    for start in range(0, q, chunk):
        sim = (
            np.asarray(probe_feats[start : start + chunk], np.float64)
            @ np.asarray(gallery_feats, np.float64).T
        )
        rows = np.arange(len(sim))
        m = mate[start : start + chunk]
        mate_sim = sim[rows, m]
        ahead = (sim > mate_sim[:, None]) | (
            (sim == mate_sim[:, None]) & (columns[None, :] < m[:, None])
        )
        positions[start : start + len(sim)] = ahead.sum(axis=1)
        mates[start : start + len(sim)] = mate_sim
        sim[rows, m] = -np.inf
        negatives = sim[np.isfinite(sim)]
        if len(negatives) > keep:
            negatives = np.partition(negatives, len(negatives) - keep)[-keep:]
        top_negatives.append(negatives)
    negatives = np.sort(np.concatenate(top_negatives))[::-1]
    tpir, thresholds = {}, {}
    for fpir, k in zip(fpirs, need, strict=True):
        if 1 <= k <= len(negatives):
            thresholds[fpir] = float(negatives[k - 1])
            tpir[fpir] = float(np.mean(mates > thresholds[fpir]))
        else:
            thresholds[fpir] = tpir[fpir] = float("nan")
    rank = {k: float(np.mean(positions < k)) for k in ranks}
    return IdentificationResult(rank, tpir, thresholds, q, len(gallery_feats))
