"""Per-sample random flip and an optional augmentation set modelled on arcface_torch's
DALI one: random downscale-then-upscale, Gaussian blur, hue/saturation jitter, grayscale.

Parameters are drawn for a whole global batch at once from (seed, step), so each sample's
augmentation depends on its place in the global batch only: not on which process or worker
decodes it, nor on how many there are.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from jaxface.data import adaface_augment

try:
    import cv2
except ImportError:  # pragma: no cover - opencv is a dependency; Pillow/numpy fallback
    cv2 = None

_AUG_STREAM = 0xA06

# Probabilities and ranges (our choices, in the spirit of arcface_torch's DALI set).
P_DOWNSCALE, DOWNSCALE_RANGE = 0.1, (0.5, 0.8)  # side shrinks to this fraction, then back
P_BLUR, BLUR_SIGMA = 0.2, (0.5, 1.5)
P_GRAY = 0.1
HUE_DEGREES, SATURATION_RANGE = 10.0, (0.7, 1.3)

# RGB <-> YIQ: hue is a rotation of the (I, Q) plane and saturation its scale, so a whole
# colour jitter (grayscale = saturation 0) is one 3x3 matrix per image, as in DALI's hsv.
_RGB2YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def draw_params(
    seed: int,
    step: int,
    global_batch: int,
    augment: bool,
    flip: bool,
    adaface: tuple[float, float, float] | None = None,
    image_size: int = 112,
) -> dict:
    """Per-row parameters of global batch `step` (arrays of length global_batch).
    `adaface`: AdaFace's (crop, low resolution, photometric) probabilities, applied first
    (jaxface.data.adaface_augment); its draws have their own stream."""
    rng = np.random.default_rng([seed, _AUG_STREAM, step])
    n = global_batch
    params = {"flip": (rng.random(n) < 0.5) if flip else np.zeros(n, bool)}
    if augment:
        params["downscale"] = np.where(
            rng.random(n) < P_DOWNSCALE, rng.uniform(*DOWNSCALE_RANGE, n), 0.0
        )
        params["blur"] = np.where(rng.random(n) < P_BLUR, rng.uniform(*BLUR_SIGMA, n), 0.0)
        gray = rng.random(n) < P_GRAY
        hue = np.deg2rad(rng.uniform(-HUE_DEGREES, HUE_DEGREES, n))
        saturation = np.where(gray, 0.0, rng.uniform(*SATURATION_RANGE, n))
        params["colour"] = np.stack([hue, saturation], axis=1)
    if adaface is not None:
        params.update(adaface_augment.draw_params(seed, step, global_batch, adaface, image_size))
    return params


def slice_params(params: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in params.items()}


def _colour_matrix(hue: float, saturation: float) -> np.ndarray:
    c, s = np.cos(hue) * saturation, np.sin(hue) * saturation
    twist = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return (_YIQ2RGB @ twist @ _RGB2YIQ).astype(np.float32)


def apply(image: np.ndarray, params: dict, row: int, out: np.ndarray) -> None:
    """Augment one uint8 [H, W, 3] image with row `row` of `params`, into `out` (which may
    be the image itself)."""
    if "ada_crop" in params:
        image = adaface_augment.apply(image, params, row)
    if "downscale" in params:
        image = _augment(image, params, row)
    if not params["flip"][row]:
        if image is not out:
            out[...] = image
    elif cv2 is not None:
        cv2.flip(image, 1, dst=out)  # 40x faster than numpy's [:, ::-1] copy; in place works
    else:
        out[...] = image[:, ::-1]


def _augment(image: np.ndarray, params: dict, row: int) -> np.ndarray:

    scale, sigma = float(params["downscale"][row]), float(params["blur"][row])
    if cv2 is not None:
        h, w = image.shape[:2]
        if scale:
            small = (max(1, round(w * scale)), max(1, round(h * scale)))
            down = cv2.resize(image, small, interpolation=cv2.INTER_LINEAR)
            image = cv2.resize(down, (w, h), interpolation=cv2.INTER_LINEAR)
        if sigma:
            image = cv2.GaussianBlur(image, (0, 0), sigma)
    elif scale or sigma:
        pil = Image.fromarray(np.ascontiguousarray(image))
        if scale:
            h, w = image.shape[:2]
            small = (max(1, round(w * scale)), max(1, round(h * scale)))
            pil = pil.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
        if sigma:
            pil = pil.filter(ImageFilter.GaussianBlur(sigma))
        image = np.asarray(pil)
    hue, saturation = params["colour"][row]
    matrix = _colour_matrix(float(hue), float(saturation))
    if cv2 is not None:
        return cv2.transform(image, matrix)  # rounds and saturates to uint8 itself
    mixed = image.reshape(-1, 3).astype(np.float32) @ matrix.T
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8).reshape(image.shape)
