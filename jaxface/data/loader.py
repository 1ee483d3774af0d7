"""Host loader: this process's rows of global batch `step`, decoded by worker processes.

`batch(step)` is a pure function of (source, seed, global_batch, step): the sample order is
a seeded permutation per epoch, the last partial global batch of every epoch is dropped,
and process p of P gets rows [p * rows, (p + 1) * rows) with rows = global_batch / P. So
across processes every sample of an epoch's kept part appears exactly once, and a run
resumed at step s continues with exactly batch s (the position is the step; `state_dict`
records it with the facts that must match on restore).

Workers (spawned, never forked: the main process may hold jax's threads) read and decode
straight into a shared-memory ring of `prefetch + 1` batches; only labels and skip reports
travel back through pipes. No jax import here.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as wait_all
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from jaxface.data import augment as aug
from jaxface.data.recordio import RecordIOError, RecordIOWarning
from jaxface.data.sources import ImageSource

_ORDER_STREAM = 0x0D3
_MAX_SKIPS = 64  # consecutive bad records tolerated before giving up on skip_corrupt


def _load_into(source, read_into, n, index, out, skip_corrupt: bool, skipped: list) -> int:
    """Decode sample `index` of the `n` into `out`, return its label; with skip_corrupt a
    bad record is replaced by the next good one in index order (deterministic, so a resumed
    run still sees the same batches). `read_into`: the source's in-place decoder, if any."""
    for attempt in range(_MAX_SKIPS + 1):
        j = (index + attempt) % n
        try:
            if read_into is not None:
                return read_into(j, out)
            image, label = source[j]
        except RecordIOError as exc:
            if not skip_corrupt:
                raise
            skipped.append((j, str(exc)))
            continue
        if image.shape != out.shape:
            raise RecordIOError(
                f"source gave an image of shape {image.shape}, expected {out.shape}", key=j
            )
        out[...] = image
        return label
    raise RecordIOError(
        f"{_MAX_SKIPS + 1} consecutive bad records from image index {index}: giving up "
        "(skip_corrupt tolerates isolated bad records, not a broken file)"
    )


def _fill(source, out, row0, indices, params, skip_corrupt):
    """Decode `indices` into out[row0 : row0 + len] and augment them there; returns
    (labels, skipped)."""
    labels = np.empty(len(indices), np.int32)
    skipped: list = []
    n = len(source)
    read_into = getattr(source, "read_into", None)  # RecordIO: decodes in place, no copy
    for r, index in enumerate(indices.tolist()):
        row = out[row0 + r]
        labels[r] = _load_into(source, read_into, n, index, row, skip_corrupt, skipped)
        aug.apply(row, params, r, row)
    return labels, skipped


RING_PREFIX = "jaxface-ring-"
_MAX_POOL_RESTARTS = 3  # decode-worker deaths tolerated in one run before giving up


def _script_reimported_by_a_worker() -> str | None:
    """The parent's script, when this call comes from its top-level code being re-run by a
    spawned process importing it (`__mp_main__`); None otherwise."""
    main = sys.modules.get("__mp_main__")
    # `_inheriting`: multiprocessing's own flag for a spawned child still bootstrapping
    # (what its "before the current process has finished its bootstrapping" check reads).
    if main is None or not getattr(multiprocessing.current_process(), "_inheriting", False):
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            return getattr(main, "__file__", "the main script")
        frame = frame.f_back
    return None


class LoaderError(RuntimeError):
    """The data loader cannot go on (its workers keep dying); the message says why."""


def _ring_folders() -> list[str | None]:
    return ["/dev/shm", None] if os.path.isdir("/dev/shm") else [None]


def remove_stale_rings() -> list[Path]:
    """Delete ring files whose creating process is gone (a run killed with SIGKILL cannot
    clean up after itself); returns what was removed."""
    return _remove_rings(lambda pid: not _alive(pid))


def remove_own_rings() -> list[Path]:
    """Delete this process's ring files, for an exit that runs no loader's close()
    (`os._exit` when a peer process is lost)."""
    return _remove_rings(lambda pid: pid == os.getpid())


def _remove_rings(owner_matches) -> list[Path]:
    removed = []
    for folder in _ring_folders():
        for path in Path(folder or tempfile.gettempdir()).glob(f"{RING_PREFIX}*"):
            m = re.match(rf"{RING_PREFIX}(\d+)-", path.name)
            if m and owner_matches(int(m.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def make_ring_file(size: int) -> str:
    """A file of `size` bytes for the shared ring: in /dev/shm when it has room (a Docker
    default is 64 MB, and writing past a full tmpfs kills the writer with SIGBUS, so the
    space is reserved up front), else in the temporary folder (page cache, nearly as fast).
    The name carries this process's id, so that a later run can remove it if we die."""
    for folder in _ring_folders():
        fd, path = tempfile.mkstemp(prefix=f"{RING_PREFIX}{os.getpid()}-", dir=folder)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # macOS: no reservation, but no small tmpfs either
                os.ftruncate(fd, size)
            return path
        except OSError:
            os.unlink(path)
            if folder is None:
                raise
        finally:
            os.close(fd)
    raise AssertionError("unreachable")


# --- Worker side: state set once per process by the pool initializer. ---
_WORKER: dict = {}


def _worker_init(source, ring_path: str, ring_shape: tuple, skip_corrupt: bool):
    # The trainer decides when to stop: a Ctrl-C, SIGTERM or SLURM's SIGUSR1 sent to the
    # whole process group must not kill the workers under the batch it is finishing.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER.update(
        source=source,
        # A plain ndarray view: indexing a np.memmap costs ~10 us a row in Python.
        ring=np.memmap(ring_path, np.uint8, "r+", shape=ring_shape).view(np.ndarray),
        skip_corrupt=skip_corrupt,
    )


def _exit_with_parent(parent: int) -> None:
    """A worker whose trainer died (even by SIGKILL, which runs no cleanup) exits too."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _worker_task(slot: int, row0: int, indices: np.ndarray, params: dict):
    w = _WORKER
    return _fill(w["source"], w["ring"][slot], row0, indices, params, w["skip_corrupt"])


class HostLoader:
    """`batch(step) -> (uint8 [rows, S, S, 3], int32 [rows])` for this process's rows.

    workers=0 decodes in the calling thread; workers=N uses N spawned processes and keeps
    `prefetch` batches in flight ahead of the last one asked for, each split into `chunk`-row
    tasks (default: one per worker). Iterating yields batches
    from `self.step` on and advances it.
    """

    def __init__(
        self,
        source: ImageSource,
        global_batch: int,
        *,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        workers: int = 0,
        prefetch: int = 2,
        flip: bool = True,
        augment: bool = False,
        adaface: tuple[float, float, float] | None = None,
        skip_corrupt: bool = False,
        image_size: int = 112,
        chunk: int | None = None,
    ):
        script = _script_reimported_by_a_worker()
        if workers and script is not None:
            # Spawned decode workers import the parent's script again; unguarded, it makes
            # a loader whose workers would do the same. One line, no traceback, per worker.
            print(
                f"jaxface.data.loader: {script} creates a HostLoader at import, so every "
                "spawned decode worker runs it again: put that code under "
                '`if __name__ == "__main__":`',
                file=sys.stderr,
            )
            raise SystemExit(1)
        if global_batch % process_count:
            raise ValueError(
                f"global batch {global_batch} is not divisible by {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self.source = source
        self.num_samples = len(source)
        self.num_classes = source.num_classes
        self.global_batch = global_batch
        self.steps_per_epoch = self.num_samples // global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the source has {self.num_samples} images, fewer than one global batch "
                f"({global_batch})"
            )
        self.seed = seed
        self.rows = global_batch // process_count
        self.row_start = process_index * self.rows
        self.flip, self.augment, self.skip_corrupt = flip, augment, skip_corrupt
        self.adaface = adaface  # AdaFace's (crop, low-res, photometric) probabilities
        self.image_size = image_size
        self.workers, self.prefetch = workers, max(0, prefetch)
        # One task per worker per batch by default: each task costs the main process a
        # pickle, a pipe write and a future (about 1 ms), which at 32 rows a task was 10 %
        # of the loader's CPU; prefetch keeps every worker busy anyway.
        self.chunk = max(1, chunk or -(-self.rows // max(1, workers)))
        self.step = 0
        self.skipped: dict[int, str] = {}  # image index -> why, every bad record seen
        self.restarts = 0  # worker pools replaced after a worker died
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pool = None
        self._pending: dict[int, list] = {}
        self._ring = None
        self._ring_path: str | None = None

    # --- Order -------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of sample indices for `epoch` (same on every process)."""
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
            order = rng.permutation(self.num_samples)
            # Two epochs suffice: the current one and the next one prefetch reaches into.
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order

    def global_indices(self, step: int) -> np.ndarray:
        """Sample indices of the whole global batch `step`."""
        if step < 0:
            raise ValueError(f"step {step} < 0")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of this process's rows of global batch `step`."""
        return self.global_indices(step)[self.row_start : self.row_start + self.rows]

    def _params(self, step: int) -> dict:
        params = aug.draw_params(
            self.seed,
            step,
            self.global_batch,
            self.augment,
            self.flip,
            self.adaface,
            self.image_size,
        )
        return aug.slice_params(params, self.row_start, self.row_start + self.rows)

    # --- Batches -----------------------------------------------------------------------

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [rows, S, S, 3] and int32 labels [rows] of global batch `step`.

        The images are a copy of the ring slot. Handing out the slot itself would save 7 %
        of the loader's CPU, but jax may keep pointing at host memory it was given
        (make_array_from_process_local_data does, for one row per device on CPU), and the
        slot is refilled a few steps later."""
        with self._lock:
            if self.workers <= 0:
                shape = (self.rows, self.image_size, self.image_size, 3)
                images = np.empty(shape, np.uint8)
                labels, skipped = _fill(
                    self.source,
                    images,
                    0,
                    self.indices(step),
                    self._params(step),
                    self.skip_corrupt,
                )
                self._note_skipped(skipped)
                return images, labels
            return self._batch_from_workers(step)

    def _start_pool(self) -> None:
        remove_stale_rings()
        slots = self.prefetch + 1
        shape = (slots, self.rows, self.image_size, self.image_size, 3)
        self._ring_path = make_ring_file(int(np.prod(shape)))
        # Removed at close(), or when the loader is collected, or at exit.
        self._ring_cleanup = weakref.finalize(self, Path(self._ring_path).unlink, missing_ok=True)
        self._ring = np.memmap(self._ring_path, np.uint8, "r+", shape=shape).view(np.ndarray)
        # An executor, not multiprocessing.Pool: a worker that dies (out of memory, a
        # crash in a decoder) fails the pending batches instead of hanging them forever.
        self._pool = ProcessPoolExecutor(
            self.workers,
            multiprocessing.get_context("spawn"),
            _worker_init,
            (self.source, self._ring_path, shape, self.skip_corrupt),
        )

    def _submit(self, step: int) -> None:
        slot = step % (self.prefetch + 1)
        indices, params = self.indices(step), self._params(step)
        tasks = []
        for row0 in range(0, self.rows, self.chunk):
            row1 = min(row0 + self.chunk, self.rows)
            args = (slot, row0, indices[row0:row1], aug.slice_params(params, row0, row1))
            tasks.append(self._pool.submit(_worker_task, *args))
        self._pending[step] = tasks

    def _batch_from_workers(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        while True:
            if self._pool is None:
                self._start_pool()
            try:
                results = self._results(step)
                break
            except BrokenProcessPool:
                # A batch is a pure function of the step: a new pool redoes it exactly.
                self._restart_pool(step)
        for _, skipped in results:
            self._note_skipped(skipped)
        labels = np.concatenate([labels for labels, _ in results])
        return np.array(self._ring[step % (self.prefetch + 1)]), labels

    def _results(self, step: int) -> list:
        window = range(step, step + self.prefetch + 1)
        # Slots are step % (prefetch + 1): only a window of consecutive steps may be in
        # flight, so finish (and drop) anything outside it before reusing its slot.
        for other in [s for s in self._pending if s not in window]:
            wait_all(self._pending.pop(other))
        for s in window:
            if s not in self._pending:
                self._submit(s)
        return [task.result() for task in self._pending.pop(step)]

    def _restart_pool(self, step: int) -> None:
        self.restarts += 1
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._pending.clear()
        if self.restarts > _MAX_POOL_RESTARTS:
            raise LoaderError(
                f"data loader: a decode worker died {self.restarts} times (the last while "
                f"loading step {step}); killed for memory? a crash in the image decoder? "
                "Fewer workers (config key 'num_workers') or a smaller prefetch use less "
                "memory. From a script: the workers' own messages above say if it lacks "
                '`if __name__ == "__main__":`'
            )
        warnings.warn(
            f"data loader: a decode worker died while loading step {step}; restarted the "
            f"workers ({self.restarts} of {_MAX_POOL_RESTARTS} restarts allowed)",
            RecordIOWarning,
            stacklevel=4,
        )

    def _note_skipped(self, skipped: list) -> None:
        for index, why in skipped:
            if index not in self.skipped:
                self.skipped[index] = why
                warnings.warn(f"skipped corrupt record: {why}", RecordIOWarning, stacklevel=4)

    def report(self) -> str:
        """One line per skipped record (empty when none)."""
        if not self.skipped:
            return ""
        lines = [f"skip_corrupt: {len(self.skipped)} bad record(s) skipped and replaced:"]
        lines += [f"  image {i}: {why}" for i, why in sorted(self.skipped.items())]
        return "\n".join(lines)

    # --- Position ----------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.batch(self.step)
        self.step += 1
        return images, labels

    def state_dict(self) -> dict:
        """The position (next step) and what must match for it to mean the same batches."""
        return {
            "step": self.step,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has "
                    f"{getattr(self, key)}: the saved position would name different batches"
                )
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop the workers, free the ring and print the skip report, if any."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            self._pending.clear()
            self._ring = None
            if self._ring_path is not None:
                self._ring_cleanup()
                self._ring_path = None
        if self.skipped:
            warnings.warn(self.report(), RecordIOWarning, stacklevel=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
