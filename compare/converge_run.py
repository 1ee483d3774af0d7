"""What both frameworks' runs of python -m compare.converge share: the initial-weights file,
the curves they record, verification with the trainer's protocol. numpy only (each run
process imports one framework)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxface.data.verification import evaluate
from jaxface.fileio import atomic_write


def write_init(path: Path, state_dict: dict, centres: np.ndarray) -> None:
    """The initial weights every run of one seed starts from: the backbone as arcface_torch's
    state dict, the class centres [C, E]."""
    arrays = {f"sd/{k}": np.asarray(v) for k, v in state_dict.items()}
    atomic_write(path, lambda f: np.savez(f, centres=centres, **arrays))


def read_init(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(path) as data:
        state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
        return state_dict, data["centres"]


def evaluate_embeddings(embed: Callable, images: np.ndarray, issame: np.ndarray):
    """(protocol result, L2-normalised sum of each image's and its flip's embedding): the
    10-fold protocol of jaxface.data.verification and the vectors it compares."""
    emb = np.asarray(embed(images), np.float64)
    flipped = np.asarray(embed(np.ascontiguousarray(images[:, :, ::-1])), np.float64)
    summed = emb + flipped
    summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    return evaluate(emb, flipped, issame), summed.astype(np.float32)


class Curves:
    """Every step's loss, learning rate, backbone gradient norm and skip flag; samples/s
    per logging window (compilation and evaluation excluded); accuracy at evaluation steps."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.pending: list = []  # the device's metrics since the last log step
        self.loss: list[float] = []
        self.lr: list[float] = []
        self.grad_norm: list[float] = []
        self.skipped: list[bool] = []
        self.rate: list[tuple[int, float]] = []  # (step, samples/s of the window ending there)
        self.val: dict[str, list[dict]] = {}
        self.compile_s = 0.0
        self._window_loss = float("nan")
        self._clock = (0, time.perf_counter())

    def restart_clock(self, step: int) -> None:
        self._clock = (step, time.perf_counter())

    def add(self, step: int, loss, lr, grad_norm, skipped) -> None:
        self.loss += loss
        self.lr += lr
        self.grad_norm += grad_norm
        self.skipped += skipped
        finite = [v for v in loss if math.isfinite(v)]
        self._window_loss = sum(finite) / len(finite) if finite else float("nan")
        first, t0 = self._clock
        if step > first:
            self.rate.append(
                (step, (step - first) * self.global_batch / (time.perf_counter() - t0))
            )
        self.restart_clock(step)

    def progress(self, step: int, total: int) -> str:
        rate = (
            f"  {self.rate[-1][1]:.0f} samples/s" if self.rate and self.rate[-1][0] == step else ""
        )
        skipped = sum(self.skipped)
        skips = f"  {skipped} step(s) skipped (fp16 overflow)" if skipped else ""
        return (
            f"step {step}/{total}  loss {self._window_loss:.4f}  lr {self.lr[-1]:.5f}{rate}{skips}"
        )

    def add_val(self, step: int, targets, embed: Callable, say) -> dict[str, np.ndarray]:
        """Score every (name, images, issame) target; returns the normalised embeddings."""
        vectors = {}
        for name, images, issame in targets:
            result, vectors[name] = evaluate_embeddings(embed, images, issame)
            self.val.setdefault(name, []).append({"step": step, **result.as_dict()})
            say(
                f"[{name}][{step}] accuracy {100 * result.accuracy:.2f} +- {100 * result.std:.2f} %"
            )
        return vectors

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "skipped": self.skipped,
            "samples_per_s": self.rate,
            "val": self.val,
            "compile_s": self.compile_s,
        }
