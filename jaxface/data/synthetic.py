"""Synthetic face-like identities that a model can actually learn.

Each identity has a smooth random colour template (a coarse random grid, bilinearly
upsampled); each of its images is that template shifted by a few pixels plus Gaussian
noise. Everything is a pure function of (seed, identity, sample), so any process can draw
any image without coordination, and held-out samples (indices the training stream never
uses) give verification pairs of unseen images.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from jaxface.data.verification import write_bin
from jaxface.models.names import IMAGE_SIZE

_TEMPLATE_STREAM = 0x7E3A
_IMAGE_STREAM = 0x1A6E
_HELDOUT_STREAM = 0x4E1D


def _upsample_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] bilinear interpolation weights (align-corners)."""
    pos = np.linspace(0, src - 1, dst)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


class SyntheticFaces:
    """Deterministic images: `image(identity, sample)` -> uint8 [112, 112, 3] RGB."""

    def __init__(
        self,
        num_classes: int,
        seed: int = 0,
        noise: float = 0.35,
        jitter: int = 4,
        grid: int = 6,
        image_size: int = IMAGE_SIZE,
    ):
        self.num_classes = num_classes
        self.seed = seed
        self.noise = noise
        self.jitter = jitter
        self.image_size = image_size
        self._grid = grid
        self._up = _upsample_matrix(grid, image_size + 2 * jitter)
        self.template = lru_cache(maxsize=8192)(self._template)

    def _template(self, identity: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _TEMPLATE_STREAM, identity])
        coarse = rng.random((self._grid, self._grid, 3))
        rows = np.tensordot(self._up, coarse, axes=(1, 0))  # [S, grid, 3]
        return np.einsum("lk,ikc->ilc", self._up, rows, optimize=True).astype(np.float32)

    def image(self, identity: int, sample: int) -> np.ndarray:
        if not 0 <= identity < self.num_classes:
            raise ValueError(f"identity {identity} outside [0, {self.num_classes})")
        rng = np.random.default_rng([self.seed, _IMAGE_STREAM, identity, sample])
        dy, dx = rng.integers(0, 2 * self.jitter + 1, size=2)
        size = self.image_size
        img = self.template(identity)[dy : dy + size, dx : dx + size]
        img = img + self.noise * rng.standard_normal(img.shape, dtype=np.float32)
        return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def heldout_image(
        self, identity: int, sample: int, noise: float, shift: float, zoom: float
    ) -> np.ndarray:
        """An unseen image made harder than training's: the template moved by up to
        `shift` pixels, scaled by up to 1 +- `zoom` and rotated by up to 10 degrees, with
        Gaussian noise of std `noise` (training images only shift by `jitter`)."""
        rng = np.random.default_rng([self.seed, _HELDOUT_STREAM, identity, sample])
        template = self.template(identity)
        centre = np.array(template.shape[1::-1], np.float64) / 2
        angle = rng.uniform(-10, 10)
        scale = rng.uniform(1 - zoom, 1 + zoom)
        forward = cv2.getRotationMatrix2D(tuple(centre), angle, scale)
        size = self.image_size
        # Centre the crop on the template's centre, then move it.
        forward[:, 2] += rng.uniform(-shift, shift, 2) - (centre - size / 2)
        img = cv2.warpAffine(template, forward, (size, size), borderMode=cv2.BORDER_REFLECT)
        img = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
        return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def batch(self, identities, samples) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack(
            [self.image(int(i), int(s)) for i, s in zip(identities, samples, strict=True)]
        )
        return images, np.asarray(identities, np.int32)


# How held-out verification pairs are made harder than training images, so that accuracy
# tracks learning (training's own noise and shift are separable by raw pixels from the first
# steps: 99.8 % at step 20 of the demo). Tuned on the demo (docs/training.md has the curve).
HELDOUT = dict(noise=2.5, shift=12.0, zoom=0.15, nearest=64)


def heldout_pairs(faces: SyntheticFaces, num_image: int, num_pairs: int, seed: int = 1):
    """Half same-identity, half different-identity pairs of images never trained on.

    Training uses samples 0 .. ceil(num_image / C) - 1 of each identity (the numbering of
    SyntheticDataset and of the packed demo set); these pairs draw from the samples above,
    with more noise (`noise` times training's), shift, scale and rotation than training
    images, and each different-identity pair takes, of `nearest` random identities, the one
    whose template looks most alike (a hard negative). Returns (images_a, images_b, same).
    """
    rng = np.random.default_rng([faces.seed, seed, num_pairs])
    c = faces.num_classes
    first_unused = -(-num_image // c)
    same = np.arange(num_pairs) % 2 == 0
    id_a = rng.integers(0, c, num_pairs)
    id_b = id_a.copy()
    look = lambda i: faces.template(int(i))[::8, ::8].ravel()  # noqa: E731 - coarse is enough
    for row in np.flatnonzero(~same):
        others = (id_a[row] + rng.integers(1, max(c, 2), HELDOUT["nearest"])) % c
        distance = [np.square(look(o) - look(id_a[row])).sum() for o in others]
        id_b[row] = others[int(np.argmin(distance))]
    sample_a = first_unused + 2 * np.arange(num_pairs)
    noise = HELDOUT["noise"] * faces.noise
    draw = lambda ids, samples: np.stack([  # noqa: E731
        faces.heldout_image(int(i), int(s), noise, HELDOUT["shift"], HELDOUT["zoom"])
        for i, s in zip(ids, samples, strict=True)
    ])  # fmt: skip
    return draw(id_a, sample_a), draw(id_b, sample_a + 1), same


def write_synthetic_bin(path, faces: SyntheticFaces, num_image: int, num_pairs: int) -> None:
    """A verification `.bin` of held-out synthetic pairs, in InsightFace's format."""
    images_a, images_b, same = heldout_pairs(faces, num_image, num_pairs)
    images = np.empty((2 * num_pairs, *images_a.shape[1:]), np.uint8)
    images[0::2], images[1::2] = images_a, images_b
    write_bin(path, images, same)
