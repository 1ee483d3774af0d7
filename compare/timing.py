"""The measurement both frameworks share: warm-up, a free-running timed stretch, then
per-step synchronised steps for the median step time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def measure(
    step: Callable[[], object],
    sync: Callable[[object], None],
    warmup: int,
    steps: int,
    samples_per_step: int,
) -> dict:
    """`step()` runs one training step and returns something `sync` waits on.

    samples/s comes from `steps` steps issued back to back with one synchronisation at the
    end (what a training loop that syncs only to log sees); ms/step is the median of up to
    20 steps each synchronised on its own (compile and warm-up excluded from both)."""
    for _ in range(max(1, warmup)):
        out = step()
    sync(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    elapsed = time.perf_counter() - start
    times = []
    for _ in range(min(steps, 20)):
        t = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t)
    return {
        "samples_per_s": steps * samples_per_step / elapsed,
        "ms_per_step": 1000 * statistics.median(times),
        "timed_steps": steps,
        "warmup_steps": max(1, warmup),
    }


def random_batches(cfg, global_batch: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` distinct global batches of random uint8 images and labels (the same for both
    frameworks, from cfg.seed): a pool to cycle, so that no batch is learnt by heart."""
    rng = np.random.default_rng(cfg.seed)
    return [
        (
            rng.integers(0, 256, (global_batch, 112, 112, 3), np.uint8),
            rng.integers(0, cfg.num_classes, global_batch).astype(np.int32),
        )
        for _ in range(count)
    ]
