"""AdaFace's training augmentation (mk-minchul/AdaFace, dataset/augmenter.py and the
record dataset's `augment`), each step with its own probability, in AdaFace's order:

1. crop with zero padding: torchvision's RandomResizedCrop box (scale (0.2, 1), ratio
   (3/4, 4/3), its ten attempts and central fallback); the box keeps its pixels and place,
   everything outside it becomes black (AdaFace pastes the crop back at (i, j) into zeros;
   it does not resize it);
2. low resolution: the image shrunk to a square of side int(U(0.2, 1) * 112) and scaled
   back up, each resize with an interpolation drawn from nearest, linear, area, cubic,
   Lanczos;
3. photometric: torchvision ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5,
   hue=0): factors from U(0.5, 1.5) applied in a random order, with PIL ImageEnhance's
   arithmetic (blend with black, with the grey mean, with the greyscale image).

Parameters come from numpy's generator on (seed, stream, step) for the whole global batch,
like `jaxface.data.augment`, so each sample's augmentation is a function of (seed, step,
place in the global batch) only. AdaFace draws from the process-global `np.random` and
torch's RNG in each worker, so its draws cannot be reproduced; jaxface's are. Differences
(docs/losses.md): photometric arithmetic in float32 rounded after each operation (PIL
rounds in integers), and Lanczos is OpenCV's (PIL's when OpenCV is absent).
"""

from __future__ import annotations

import math

import numpy as np

try:
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None

_STREAM = 0xADA
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
LOW_RES_RANGE = (0.2, 1.0)
JITTER = 0.5  # brightness, contrast and saturation factors in [1 - 0.5, 1 + 0.5]
_INTERPOLATIONS = 5  # nearest, linear, area, cubic, Lanczos


def draw_params(seed: int, step: int, n: int, probs: tuple[float, float, float], size: int):
    """Per-row parameters of global batch `step`: crop box (i, j, h, w; h = 0 none), low
    resolution (side, down, up; side 0 none), photometric (order [4], factors [3]; order
    -1 none). `probs` = (crop, low resolution, photometric)."""
    rng = np.random.default_rng([seed, _STREAM, step])
    p_crop, p_low, p_photo = probs
    crop = np.zeros((n, 4), np.int32)
    use = rng.random(n) < p_crop
    # torchvision's RandomResizedCrop.get_params, ten attempts per row, vectorised.
    area = size * size
    target = area * rng.uniform(*CROP_SCALE, (n, 10))
    aspect = np.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), (n, 10)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    h, w = h[np.arange(n), first], w[np.arange(n), first]
    # The fallback for a square image is the whole image: no crop.
    h, w = np.where(found, h, size), np.where(found, w, size)
    i = np.floor(rng.random(n) * (size - h + 1)).astype(np.int64)
    j = np.floor(rng.random(n) * (size - w + 1)).astype(np.int64)
    crop[use] = np.stack([i, j, h, w], axis=1)[use]

    low = np.zeros((n, 3), np.int32)
    use = rng.random(n) < p_low
    side = (rng.uniform(*LOW_RES_RANGE, n) * size).astype(np.int64)
    interp = rng.integers(0, _INTERPOLATIONS, (n, 2))
    low[use] = np.concatenate([np.maximum(side, 1)[:, None], interp], axis=1)[use]

    order = np.full((n, 4), -1, np.int32)
    use = rng.random(n) < p_photo
    perms = np.argsort(rng.random((n, 4)), axis=1)
    order[use] = perms[use]
    factors = rng.uniform(1 - JITTER, 1 + JITTER, (n, 3)).astype(np.float32)
    return {"ada_crop": crop, "ada_low": low, "ada_order": order, "ada_factors": factors}


def _resize(image: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    if cv2 is not None:
        flags = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC,
                 cv2.INTER_LANCZOS4)  # fmt: skip
        return cv2.resize(image, (width, height), interpolation=flags[interpolation])
    from PIL import Image

    filters = (Image.NEAREST, Image.BILINEAR, Image.BOX, Image.BICUBIC, Image.LANCZOS)
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((width, height), filters[interpolation]))


_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # PIL's convert("L")


_LEVELS = np.arange(256, dtype=np.float32)


def _lut(f: float, towards: float) -> np.ndarray:
    """uint8 table of towards + f (x - towards), rounded and clipped."""
    return np.clip(np.floor(towards + f * (_LEVELS - towards) + 0.5), 0, 255).astype(np.uint8)


def _photometric(image: np.ndarray, order, factors) -> np.ndarray:
    if cv2 is None:
        return _photometric_numpy(image, order, factors)
    x = image
    for op in order:
        if op == 3:  # ColorJitter's hue: 0, skipped
            continue
        f = float(factors[op])
        if op == 0:  # brightness: blend with black
            x = cv2.LUT(x, _lut(f, 0.0))
        elif op == 1:  # contrast: blend with the mean of the greyscale image
            mean = float(np.floor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean() + 0.5))
            x = cv2.LUT(x, _lut(f, mean))
        else:  # saturation: blend with the greyscale image
            grey = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            x = cv2.addWeighted(x, f, grey, 1 - f, 0.0)
    return x


def _photometric_numpy(image: np.ndarray, order, factors) -> np.ndarray:
    x = image.astype(np.float32)
    for op in order:
        if op == 3:
            continue
        f = float(factors[op])
        if op == 0:
            x = x * f
        elif op == 1:
            mean = np.floor((x @ _GREY).mean() + 0.5)
            x = mean + f * (x - mean)
        else:
            grey = np.floor((x @ _GREY) + 0.5)[..., None]
            x = grey + f * (x - grey)
        x = np.clip(np.floor(x + 0.5), 0, 255)
    return x.astype(np.uint8)


def apply(image: np.ndarray, params: dict, row: int) -> np.ndarray:
    """Row `row`'s AdaFace augmentation of one uint8 [H, W, 3] image (a new array, or
    `image` itself when nothing applies)."""
    i, j, h, w = (int(v) for v in params["ada_crop"][row])
    if h:
        kept = np.zeros_like(image)
        kept[i : i + h, j : j + w] = image[i : i + h, j : j + w]
        image = kept
    side, down, up = (int(v) for v in params["ada_low"][row])
    if side:
        height, width = image.shape[:2]
        image = _resize(_resize(image, side, side, down), width, height, up)
    order = params["ada_order"][row]
    if order[0] >= 0:
        image = _photometric(image, order, params["ada_factors"][row])
    return image
