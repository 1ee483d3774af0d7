"""Aligned IJB faces in batches, read and aligned by worker processes (no jax here).

Workers (spawned, as jaxface.data.loader's) align a batch straight into a shared-memory ring
of `prefetch + 1` batches; only the names of faces whose landmarks lie outside their image
travel back. A missing or unreadable image stops the run with its landmark-file line.
"""

from __future__ import annotations

import math
import multiprocessing
import weakref
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from jaxface.align import IMAGE_SIZE, AlignError, align_file
from jaxface.data.loader import make_ring_file
from jaxface.ijb.meta import IJBInputError, IJBMeta

_WORKER: dict = {}


def _worker_init(ring_path: str | None, shape: tuple, landmark_file: str) -> None:
    cv2.setNumThreads(1)  # one process per core already
    ring = None
    if ring_path is not None:
        ring = np.memmap(ring_path, np.uint8, "r+", shape=shape).view(np.ndarray)
    _WORKER.update(ring=ring, landmark_file=landmark_file)


def align_into(out: np.ndarray, paths, landmarks, lines, landmark_file: str) -> list:
    """Align faces into out[i]; returns (line, path) of faces with landmarks outside."""
    outside = []
    for i, (path, points, line) in enumerate(zip(paths, landmarks, lines, strict=True)):
        try:
            out[i], off = align_file(path, points)
        except AlignError as exc:
            raise IJBInputError(f"{exc} (wanted by {landmark_file}:{line})") from None
        if off:
            outside.append((int(line), path))
    return outside


def _worker_task(slot: int, row0: int, paths, landmarks, lines) -> list:
    ring = _WORKER["ring"][slot]
    return align_into(
        ring[row0 : row0 + len(paths)], paths, landmarks, lines, _WORKER["landmark_file"]
    )


class Aligner:
    """Batches of aligned faces in order; `workers` processes keep `prefetch` batches ahead."""

    def __init__(self, meta: IJBMeta, batch: int, workers: int, prefetch: int):
        self.paths = [str(meta.image_dir / name) for name in meta.images]
        self.landmarks, self.lines = meta.landmarks, meta.lines
        self.landmark_file = str(meta.files["landmarks"])
        self.batch, self.workers = batch, workers
        self.num_batches = math.ceil(len(self.paths) / batch)
        self.slots = max(1, prefetch) + 1
        self.outside: list = []
        self.pool = None
        self.futures: dict[int, list] = {}
        if workers > 0:
            shape = (self.slots, batch, IMAGE_SIZE, IMAGE_SIZE, 3)
            ring_path = make_ring_file(int(np.prod(shape)))
            self._cleanup = weakref.finalize(self, Path(ring_path).unlink, missing_ok=True)
            self.ring = np.memmap(ring_path, np.uint8, "r+", shape=shape).view(np.ndarray)
            self.pool = ProcessPoolExecutor(
                workers,
                multiprocessing.get_context("spawn"),  # never fork a process holding jax
                _worker_init,
                (ring_path, shape, self.landmark_file),
            )
            for b in range(min(self.slots, self.num_batches)):
                self._submit(b)

    def _range(self, b: int) -> tuple[int, int]:
        return b * self.batch, min(len(self.paths), (b + 1) * self.batch)

    def _submit(self, b: int) -> None:
        start, stop = self._range(b)
        step = math.ceil((stop - start) / self.workers)
        self.futures[b] = []
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            self.futures[b].append(
                self.pool.submit(
                    _worker_task,
                    b % self.slots,
                    lo - start,
                    self.paths[lo:hi],
                    self.landmarks[lo:hi],
                    self.lines[lo:hi],
                )
            )

    def get(self, b: int) -> np.ndarray:
        """uint8 [rows, 112, 112, 3] of batch b (a copy: the ring slot is refilled)."""
        start, stop = self._range(b)
        if self.pool is None:
            images = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            self.outside += align_into(
                images, self.paths[start:stop], self.landmarks[start:stop],
                self.lines[start:stop], self.landmark_file,
            )  # fmt: skip
            return images
        for future in self.futures.pop(b):
            self.outside += future.result()
        images = self.ring[b % self.slots, : stop - start].copy()
        if b + self.slots < self.num_batches:
            self._submit(b + self.slots)
        return images

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            self._cleanup()
