"""Orbax checkpoints of the whole TrainState, and resume on any device count.

A checkpoint holds two items: `state` (the TrainState: parameters, BatchNorm statistics,
optimizer state, class centres, step, RNG) and `meta` (JSON: the config, the data position,
the class count). The class centres are saved as one global array, not per device, so a
run saved on 8 devices resumes on 4: the head is read back into the new mesh's sharding,
its zero padding rows cut or added to the new device count's multiple.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact and the partial one is
ignored. A save that fails for lack of space (found in the background, so reported by the
next save or wait) removes its temporary folder and stops the run in one line; orbax
deletes the oldest checkpoints only after a new one is complete, so the earlier ones stay.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxface.diskspace import disk_full, format_bytes, free_bytes, tree_bytes
from jaxface.step import is_head


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says which and why."""


class NoUsableCheckpoint(CheckpointError):
    """The folder holds checkpoints, but none can be read (each moved aside)."""


def array_name(path) -> str:
    """A state leaf's name as orbax records it: `opt_state.backbone.2.0.trace.bn1.bias`."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def array_specs(tree) -> dict[str, tuple]:
    """name -> (shape, dtype) of every leaf of a (possibly abstract) state."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {array_name(path): (tuple(x.shape), str(x.dtype)) for path, x in leaves}


def is_head_name(name: str) -> bool:
    """Arrays under `head` (the centres, their momentum): their rows follow the device
    count's padding, so only their first dimension may differ on resume."""
    return "head" in name.split(".")


def _is_read_failure(exc: Exception) -> bool:
    """True when restoring failed because the files cannot be read (truncated, missing,
    garbled): the checkpoint is damaged. False for what says nothing about the files: a
    structure mismatch that the resume check missed, memory exhausted."""
    text = str(exc)
    if isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text:
        return False
    return "structures do not match" not in text


def _placeholder(x) -> bool:
    return x is ocp.PLACEHOLDER


def _orbax_chatter(record: logging.LogRecord) -> bool:
    """False for orbax's informational warnings ("Metadata file does not exist" on every
    restore of a fresh folder): they mean nothing to a user. Its errors still show, except
    a full disk's tracebacks: the Checkpointer reports that in one line."""
    if "orbax" not in record.pathname:
        return True
    cause = (record.exc_info or (None, None))[1] or record.getMessage()
    return record.levelno >= logging.ERROR and not disk_full(cause) and not _peer_gone(cause)


def _peer_gone(cause) -> bool:
    """A save's collective failed because another process died: jaxface.peers reports
    that in one line (a killed coordinator once left orbax's finalize-thread traceback
    before it, seen in tests/test_peers.py)."""
    text = str(cause)
    return "Connection closed by peer" in text or "Gloo all-reduce failed" in text


def _disk_full_echo(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" of a write that failed
    for lack of space: the Checkpointer reports the failure in one line."""
    return not disk_full((record.exc_info or (None, None))[1])


def _quiet_closed_loop(previous):
    def hook(unraisable) -> None:
        # After a failed save, orbax closes its event loop while tensorstore writes are
        # still in flight; each completes into the closed loop and would print a
        # traceback of its own (dozens), none of which says more than the failure.
        exc = unraisable.exc_value
        closed = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        if not (closed and unraisable.object is None):
            previous(unraisable)

    hook.jaxface = True
    return hook


def _quiet_orbax() -> None:
    absl, aio = logging.getLogger("absl"), logging.getLogger("asyncio")
    if _orbax_chatter not in absl.filters:
        absl.addFilter(_orbax_chatter)
    if _disk_full_echo not in aio.filters:
        aio.addFilter(_disk_full_echo)
    if not getattr(sys.unraisablehook, "jaxface", False):
        sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


class Checkpointer:
    """Saves when asked (asynchronously), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str | Path, keep: int, asynchronous: bool = True):
        _quiet_orbax()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._saving: tuple[int, int] | None = None  # (step, bytes) of the last save started
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the devices.
        Raises CheckpointError when this save, or the previous one still being written,
        fails for lack of space."""
        needed = tree_bytes(state)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as exc:
            self._raise_if_disk_full(exc, (step, needed))
            raise
        self._saving = (step, needed)

    def _raise_if_disk_full(self, exc: Exception, current: tuple[int, int] | None) -> None:
        """A save that failed for lack of space: its temporary folder removed (the space
        back, nothing half-written left), then one CheckpointError naming the folder, what
        the save needed and what is free."""
        short = disk_full(exc)
        if short is None:
            return
        self._failed = True
        partial = sorted(self.directory.glob("*.orbax-checkpoint-tmp*"))
        if jax.process_index() == 0:
            for folder in partial:
                shutil.rmtree(folder, ignore_errors=True)
        # The error of a background write surfaces at the next save: name its step.
        steps = sorted(
            {int(p.name.split(".")[0]) for p in partial if p.name.split(".")[0].isdigit()}
        )
        step, needed = current or self._saving or (None, 0)
        if steps:
            step = steps[0]
        # From the folder: orbax's own list already forgot the steps it meant to delete.
        kept = finished_steps(self.directory)
        earlier = f"step{'s' * (len(kept) > 1)} {', '.join(map(str, kept))}" if kept else "none"
        raise CheckpointError(
            f"checkpoint step {step} could not be saved in {self.directory}: {short} (a "
            f"checkpoint needs {format_bytes(needed)}, {format_bytes(free_bytes(self.directory))}"
            f" is free); earlier checkpoints kept: {earlier}. A new checkpoint is written "
            "before the oldest is deleted: free space or lower keep_checkpoints, then continue "
            "with --config.resume=auto"
        ) from None

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def saved_arrays(self, step: int) -> dict[str, tuple]:
        """name -> (shape, dtype) of every array of checkpoint `step`, from orbax's
        metadata: nothing but the small metadata file is read."""
        metadata = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state")
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        return {leaf.name: (tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree)}

    def restore(self, abstract_state: Any, decide, fresh, warn=print) -> tuple[Any, dict, Any]:
        """The newest readable checkpoint placed in `abstract_state`'s shardings, its meta,
        and what `decide` said of it.

        `decide(meta, saved_arrays, folder)` runs before any array is read: it raises to
        refuse the checkpoint (which keeps its name), or returns a `jaxface.resume.ResumePlan`;
        when it is `converting`, the arrays that match are read by name and the rest taken
        from `fresh(names)` (name -> array).
        A checkpoint whose files cannot be read (truncated, missing) is reported through
        `warn` in one line, moved aside to `STEP.damaged-DATE` (never deleted), and the one
        before it is tried. Raises CheckpointError if none is readable."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(
                f"config key 'resume'=True, but {self.directory} holds no checkpoint; "
                "start without --config.resume=true"
            )
        failures = []
        for step in steps:
            try:
                meta, saved = self.read_meta(step), self.saved_arrays(step)
            except Exception as exc:  # noqa: BLE001 - orbax raises many types for bad files
                failures.append(self._unusable(step, exc, warn))
                continue
            plan = decide(meta, saved, self.directory / str(step))
            try:
                state = self._restore_state(step, abstract_state, plan, fresh)
            except Exception as exc:  # noqa: BLE001 - likewise
                if not _is_read_failure(exc):
                    raise CheckpointError(
                        f"checkpoint {self.directory / str(step)} could not be restored (its "
                        f"files are kept): {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    ) from exc
                failures.append(self._unusable(step, exc, warn))
                continue
            if failures:
                self._manager.reload()  # forget the steps moved aside
            return state, meta, plan
        raise NoUsableCheckpoint(
            f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
        )

    def _restore_state(self, step: int, abstract_state: Any, plan, fresh) -> Any:
        def restore_args(path, leaf):
            # Only the head may change shape (its padding follows the device count).
            return ocp.ArrayRestoreArgs(
                sharding=leaf.sharding,
                global_shape=leaf.shape,
                dtype=leaf.dtype,
                strict=not is_head(path),
            )

        if not plan.converting:
            args = jax.tree_util.tree_map_with_path(restore_args, abstract_state)
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=args)
                ),
            )
            return restored.state
        # Converting: read the arrays that match (into the saved tree's own structure, the
        # others left as placeholders, never read), create the rest, assemble the new state.
        skip = set(plan.initialise)
        targets = {
            array_name(path): (path, leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        }
        metadata = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state")
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)

        def wanted(leaf):
            return leaf.name in targets and leaf.name not in skip

        def item(leaf):
            return targets[leaf.name][1] if wanted(leaf) else ocp.PLACEHOLDER

        def args(leaf):
            return restore_args(*targets[leaf.name]) if wanted(leaf) else ocp.PLACEHOLDER

        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=jax.tree.map(item, tree), restore_args=jax.tree.map(args, tree)
                )
            ),
        )
        by_name = {
            leaf.name: value
            for leaf, value in zip(
                jax.tree.leaves(tree),
                jax.tree.leaves(restored.state, is_leaf=_placeholder),
                strict=True,
            )
            if wanted(leaf)
        }
        by_name |= fresh([name for name in targets if name not in by_name])
        return jax.tree_util.tree_map_with_path(
            lambda path, _: by_name[array_name(path)], abstract_state
        )

    def _unusable(self, step: int, exc: Exception, warn) -> str:
        """Report a checkpoint that cannot be read and move it out of the way."""
        cause = " ".join(str(exc).split())[:300] or type(exc).__name__
        folder = self.directory / str(step)
        aside = folder.with_name(f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and folder.exists():
            folder.rename(aside)
        line = f"checkpoint step {step} ({folder}) cannot be read: {type(exc).__name__}: {cause}"
        warn(f"warning: {line}; moved to {aside.name}, trying the one before it")
        return line

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as exc:
            self._raise_if_disk_full(exc, None)
            raise

    def close(self) -> None:
        reported = self._failed
        try:
            self.wait()
            self._manager.close()
        except Exception as exc:
            if not (reported and disk_full(exc)):  # orbax echoing a failure already reported
                raise


def finished_steps(directory: str | Path) -> list[int]:
    """The steps of the complete checkpoints in `directory` (orbax renames a checkpoint's
    folder to its step only when complete; damaged ones were renamed `STEP.damaged-DATE`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def set_aside(path: str | Path) -> Path | None:
    """Moves an earlier run's file or folder out of the way to `NAME.DATE-TIME` (a fresh run
    never overwrites); returns where it went, or None if there was nothing to move."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    target = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    return target


def read_backbone(step_dir: str | Path) -> tuple[dict, dict, dict]:
    """(backbone params, batch_stats, info) of one checkpoint folder (RUN/checkpoints/STEP)
    as host numpy arrays: the devices here need not match the ones that saved it."""
    step_dir = Path(step_dir).absolute()
    _quiet_orbax()  # "Metadata file does not exist" for the step's sub-folders
    try:
        handler = ocp.PyTreeCheckpointer()
        meta = handler.metadata(step_dir / "state")
        # The metadata object's shape differs between orbax releases.
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = handler.restore(step_dir / "state", restore_args=as_numpy)
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    except Exception as exc:  # noqa: BLE001 - orbax raises many types for a bad folder
        raise CheckpointError(
            f"{step_dir}: cannot be read as a jaxface checkpoint: {exc}"
        ) from None
    cfg = meta.get("config", {})
    info = {"network": cfg.get("network"), "step": meta.get("step")}
    return state["params"]["backbone"], state["batch_stats"], info
