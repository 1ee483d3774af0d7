"""The numbers python -m compare.converge reports: where two curves part, how far the final
losses and accuracies are apart against the two-seed spread, and how alike the two final
backbones' embeddings and decisions are. numpy only."""

from __future__ import annotations

import math

import numpy as np

TOLERANCE = 1e-3  # relative: "the curves coincide" until they differ by more than this
EARLY_STEPS = 20  # the stretch over which fp32 curves are expected to coincide
NAMES = {"jax": "jaxface", "torch": "torchref"}


def relative_difference(a, b) -> np.ndarray:
    """|a - b| / |b| per step (torchref's value is the reference); nan where either is not
    finite (an fp16 step that overflowed)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
    rel[~(np.isfinite(a) & np.isfinite(b))] = np.nan
    return rel


def first_divergence(a, b, tolerance: float = TOLERANCE) -> int | None:
    """The first step (1-based) whose values differ by more than `tolerance` relative, a
    step one framework skipped included; None if the curves never part."""
    rel = relative_difference(a, b)
    parted = np.flatnonzero(~(rel <= tolerance))
    return int(parted[0]) + 1 if parted.size else None


def final_loss(run: dict) -> float:
    """The mean loss of the last logging window, as the trainers print it."""
    window = [v for v in run["loss"][-run["frequent"] :] if math.isfinite(v)]
    return float(np.mean(window)) if window else float("nan")


def final_accuracy(run: dict) -> dict[str, float]:
    return {name: records[-1]["accuracy"] for name, records in run["val"].items()}


def agreement(a: dict, b: dict, issame: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per verification set: the cosine between the two runs' embeddings of each image (the
    normalised sum of the image's and its flip's, as the protocol compares them), and how
    often their same/different decisions agree, each at its own best threshold."""
    out = {}
    for name, pairs_same in issame.items():
        va, vb = a["vectors"][name], b["vectors"][name]
        cosine = np.sum(va.astype(np.float64) * vb, axis=1)
        decisions = []
        for run, v in ((a, va), (b, vb)):
            distance = np.sum(np.square(v[0::2] - v[1::2], dtype=np.float64), axis=1)
            decisions.append(distance < run["val"][name][-1]["best_threshold"])
        out[name] = {
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
            "decision_agreement": float(np.mean(decisions[0] == decisions[1])),
            "pairs": int(len(pairs_same)),
        }
    return out


def compare_runs(a: dict, b: dict, issame) -> dict:
    """jaxface run `a` against torchref run `b` (or one seed against the next)."""
    early = slice(0, EARLY_STEPS)
    rel = relative_difference(a["loss"], b["loss"])
    acc_a, acc_b = final_accuracy(a), final_accuracy(b)
    return {
        "a": a["name"],
        "b": b["name"],
        "first_divergence": {
            key: first_divergence(a[key], b[key]) for key in ("loss", "grad_norm", "lr")
        },
        "max_rel_diff_early": {
            key: float(np.nanmax(relative_difference(a[key], b[key])[early]))
            for key in ("loss", "grad_norm", "lr")
        },
        "loss_rel_diff": [None if math.isnan(x) else float(x) for x in rel],
        "final_loss_diff": final_loss(a) - final_loss(b),
        "accuracy_diff": {k: acc_a[k] - acc_b[k] for k in acc_a},
        "agreement": agreement(a, b, issame) if a.get("vectors") and b.get("vectors") else {},
    }


def summarise(meta: dict, runs: dict[str, dict], issame: dict[str, np.ndarray]) -> dict:
    """results.json: every run's curves and final numbers, each jaxface/torchref pair
    compared, and in the bf16 column the two-seed spread beside the difference."""
    for run in runs.values():
        run["frequent"] = meta["frequent"]
        run["final_loss"] = final_loss(run)
        run["final_accuracy"] = final_accuracy(run)
        rates = [r for _, r in run["samples_per_s"] if math.isfinite(r)]
        run["median_samples_per_s"] = float(np.median(rates)) if rates else None
    by_key = {(r["framework"], r["column"], r["seed"]): r for r in runs.values()}
    pairs, spreads = [], []
    for (framework, column, seed), run in by_key.items():
        torch_run = by_key.get(("torch", column, seed))
        if framework == "jax" and torch_run:
            pairs.append({"column": column, "seed": seed, **compare_runs(run, torch_run, issame)})
        next_seed = by_key.get((framework, column, seed + 1))
        if next_seed:
            spread = compare_runs(next_seed, run, issame)
            spreads.append({"column": column, "framework": framework, **spread})
    for run in runs.values():
        run.pop("vectors", None)
    devices = dict.fromkeys(f"{NAMES[r['framework']]} on {r['device']}" for r in runs.values())
    meta = {**meta, "device": "; ".join(devices)}
    return {"meta": meta, "runs": runs, "pairs": pairs, "spreads": spreads}
