"""Moves host batches onto the mesh ahead of the step that needs them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding


class DeviceFeed:
    """Calls `make_batch(step)` for steps start, start+1, ... in a background thread and
    places each result (a tuple of numpy arrays, the process's rows of the global batch) into
    `sharding`, `depth` batches ahead of the consumer."""

    _DONE = object()

    def __init__(
        self,
        make_batch: Callable[[int], tuple[np.ndarray, ...]],
        sharding: NamedSharding,
        start: int,
        stop: int,
        depth: int = 2,
    ):
        self._make_batch = make_batch
        self._sharding = sharding
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, stop), daemon=True)
        self._thread.start()

    def _run(self, start: int, stop: int) -> None:
        try:
            for step in range(start, stop):
                if self._stop_event.is_set():
                    return
                arrays = self._make_batch(step)
                batch = tuple(
                    jax.make_array_from_process_local_data(self._sharding, a) for a in arrays
                )
                self._put(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._put(exc)
            return
        self._put(self._DONE)

    def _put(self, item) -> None:
        while not self._stop_event.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop_event.set()
        self._thread.join(timeout=5)
