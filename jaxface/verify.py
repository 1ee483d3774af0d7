"""Verification accuracy on `.bin` sets during training and from the command line.

Embeddings are computed on the mesh (batch sharded, eval-mode BatchNorm) for each image and
its horizontal flip; the 10-fold protocol runs on the host (jaxface.data.verification).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxface.data.verification import VerificationResult, evaluate, load_bin
from jaxface.mesh import batch_sharding


def embed_images(
    embed: Callable, params, batch_stats, images: np.ndarray, mesh: Mesh, batch: int
) -> np.ndarray:
    """float32 embeddings of uint8 images, `batch` (a multiple of the mesh size) at a time."""
    sharding = batch_sharding(mesh)
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        n = len(chunk)
        if n < batch:  # the last chunk is padded to the compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        emb = embed(params, batch_stats, jax.device_put(chunk, sharding))
        out.append(np.asarray(jax.device_get(emb))[:n])
    return np.concatenate(out)


@dataclass
class VerificationTarget:
    name: str
    images: np.ndarray
    issame: np.ndarray
    best: float = 0.0


class Verifier:
    """Loads the sets once; `run()` scores a model on all of them and tracks the best."""

    def __init__(
        self, paths: list[Path], mesh: Mesh, embed: Callable, batch: int, say=None
    ) -> None:
        self.mesh = mesh
        self.embed = embed
        self.batch = batch
        self.say = say or (lambda message: None)  # progress before each wait
        self.targets = []
        for path in paths:
            self.say(f"loading {path}")
            images, issame = load_bin(path)
            self.targets.append(VerificationTarget(Path(path).stem, images, issame))

    def run(self, params, batch_stats) -> dict[str, tuple[VerificationResult, float]]:
        """{name: (result, best accuracy so far)}."""
        results = {}
        for i, target in enumerate(self.targets):
            first = " (the first batch compiles the backbone)" if i == 0 else ""
            self.say(
                f"[{target.name}] embedding {len(target.images):,} images and their flips{first}"
            )
            emb = embed_images(
                self.embed, params, batch_stats, target.images, self.mesh, self.batch
            )
            flipped = embed_images(
                self.embed, params, batch_stats, target.images[:, :, ::-1], self.mesh, self.batch
            )
            result = evaluate(emb, flipped, target.issame)
            target.best = max(target.best, result.accuracy)
            results[target.name] = (result, target.best)
        return results


def format_result(name: str, step: int, result: VerificationResult, best: float) -> str:
    return (
        f"[{name}][{step}] XNorm {result.xnorm:.5f}  "
        f"Accuracy-Flip {result.accuracy:.5f}+-{result.std:.5f}  Highest {best:.5f}"
    )
