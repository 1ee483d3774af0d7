"""InsightFace verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`) and their protocol.

A `.bin` is a pickle of `(bins, issame_list)`: 2N encoded images, pair i being images 2i and
2i+1, and N booleans. The protocol (docs/sources.md): embed each image and its horizontal
flip, sum the two, L2-normalise, take the squared L2 distance of each pair; thresholds 0 to
4 in steps of 0.01; 10 folds in order (no shuffling), the threshold that is most accurate
on 9 folds is scored on the tenth; report the mean and standard deviation over folds.

No jax or torch here: the embeddings come in as numpy arrays.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

THRESHOLDS = np.arange(0, 4, 0.01)
NUM_FOLDS = 10


class VerificationSetError(ValueError):
    """A `.bin` file that cannot be used; the message names the file and what is wrong."""


def _decode(data: bytes, path: Path, index: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise VerificationSetError(f"{path}: image {index} cannot be decoded: {exc}") from None


def load_bin(path: str | Path, image_size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Returns uint8 images [2N, H, W, 3] RGB and issame bool [N]."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VerificationSetError(f"{path}: cannot be read: {exc}") from None
    try:
        content = pickle.loads(raw)
    except UnicodeDecodeError:
        # Pickled by Python 2 (InsightFace's own files): byte strings stay bytes.
        content = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a .bin"
        raise VerificationSetError(f"{path}: not a pickle of (bins, issame_list): {exc}") from None
    if not (isinstance(content, tuple | list) and len(content) == 2):
        raise VerificationSetError(
            f"{path}: expected a pickle of (bins, issame_list), got {type(content).__name__}"
        )
    bins, issame = content
    bins, issame = list(bins), np.asarray(list(issame), dtype=bool)
    if len(bins) % 2:
        raise VerificationSetError(f"{path}: odd number of images ({len(bins)}); pairs need 2N")
    if len(bins) != 2 * len(issame):
        raise VerificationSetError(
            f"{path}: {len(bins)} images but {len(issame)} pair labels; expected 2 images a pair"
        )
    images = np.empty((len(bins), image_size, image_size, 3), np.uint8)
    for i, data in enumerate(bins):
        if not isinstance(data, bytes | bytearray | np.ndarray):
            raise VerificationSetError(f"{path}: image {i} is {type(data).__name__}, not bytes")
        img = _decode(bytes(data), path, i)
        if img.shape != images.shape[1:]:
            raise VerificationSetError(
                f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, "
                f"expected {image_size}x{image_size}"
            )
        images[i] = img
    return images, issame


def write_bin(path: str | Path, images: np.ndarray, issame, quality: int = 95) -> None:
    """Write uint8 RGB images [2N, H, W, 3] and N pair labels as an InsightFace `.bin`."""
    issame = [bool(s) for s in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs: need 2 a pair")
    bins = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="JPEG", quality=quality)
        bins.append(buf.getvalue())
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean over folds
    std: float
    xnorm: float  # mean L2 norm of the raw embeddings (originals and flips)
    best_threshold: float  # mean over folds of the chosen squared-distance threshold

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    return float(np.mean((dist < threshold) == issame))


def evaluate(embeddings: np.ndarray, flipped: np.ndarray, issame) -> VerificationResult:
    """The 10-fold protocol on embeddings [2N, E] of the images and of their flips."""
    embeddings = np.asarray(embeddings, np.float64)
    flipped = np.asarray(flipped, np.float64)
    issame = np.asarray(issame, bool)
    xnorm = float(
        np.mean(
            np.concatenate([np.linalg.norm(embeddings, axis=1), np.linalg.norm(flipped, axis=1)])
        )
    )
    summed = embeddings + flipped
    summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    dist = np.sum(np.square(summed[0::2] - summed[1::2]), axis=1)
    n = len(issame)
    folds = np.array_split(np.arange(n), NUM_FOLDS)  # KFold without shuffling
    accuracies, thresholds = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [_accuracy(t, dist[train], issame[train]) for t in THRESHOLDS]
        best = THRESHOLDS[int(np.argmax(train_acc))]
        thresholds.append(best)
        accuracies.append(_accuracy(best, dist[test], issame[test]))
    return VerificationResult(
        accuracy=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        xnorm=xnorm,
        best_threshold=float(np.mean(thresholds)),
    )
