"""Orbax checkpoints of the whole TrainState, and resume on any device count.

A checkpoint holds two items: `state` (the TrainState: parameters, BatchNorm statistics,
optimizer state, class centres, step, RNG) and `meta` (JSON: the config, the data position,
the class count). The class centres are saved as one global array, not per device, so a
run saved on 8 devices resumes on 4: the head is read back into the new mesh's sharding,
its zero padding rows cut or added to the new device count's multiple.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact and the partial one is
ignored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxface.config import ConfigError
from jaxface.step import is_head

# Keys whose values fix the shapes in the state (the loss: its running state): a
# checkpoint must agree on them.
SHAPE_KEYS = ("network", "embedding_size", "num_classes", "optimizer", "loss")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says which and why."""


def _check_shape_keys(meta: dict, config: dict, where: Path) -> None:
    saved = meta.get("config", {})
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != config[key]:
            raise CheckpointError(
                f"checkpoint {where} was written for {key}={saved[key]!r}, but the config "
                f"says {key}={config[key]!r}"
            )


def check_data_stream(meta: dict, stream: dict, allow_change: bool) -> list[str]:
    """What differs between the data stream a checkpoint was trained on and this run's
    (`stream`: global batch, seed, data...). Raises ConfigError unless `allow_change`;
    returns the differences (empty when the same), for a warning."""
    saved = meta.get("data_stream")
    if saved is None:  # written before jaxface recorded it
        return []
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in stream.items() if saved.get(k) != v]
    if changed and not allow_change:
        raise ConfigError(
            f"resuming would change the data stream ({', '.join(changed)}), so the run would "
            "no longer equal an uninterrupted one; resume with the checkpoint's values, or "
            "set --config.allow_data_change=true to continue on the new stream"
        )
    return changed


def _orbax_chatter(record: logging.LogRecord) -> bool:
    """False for orbax's informational warnings ("Metadata file does not exist" on every
    restore of a fresh folder): they mean nothing to a user. Its errors still show."""
    return record.levelno >= logging.ERROR or "orbax" not in record.pathname


class Checkpointer:
    """Saves when asked (asynchronously), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str | Path, keep: int, asynchronous: bool = True):
        absl = logging.getLogger("absl")
        if _orbax_chatter not in absl.filters:
            absl.addFilter(_orbax_chatter)
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the devices."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored.meta

    def restore(self, abstract_state: Any, config: dict, warn=print) -> tuple[Any, dict]:
        """The newest usable checkpoint, placed in `abstract_state`'s shardings, and its
        meta. A checkpoint that cannot be read (a damaged or truncated file) is reported in
        one line through `warn`, moved aside to `STEP.damaged-DATE` (never deleted), and the
        one before it is tried. Raises CheckpointError if none is usable, or if the newest
        readable one was written for another model (SHAPE_KEYS)."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(
                f"config key 'resume'=True, but {self.directory} holds no checkpoint; "
                "start without --config.resume=true"
            )
        failures = []
        for step in steps:
            try:
                meta = self.read_meta(step)
            except Exception as exc:  # noqa: BLE001 - orbax raises many types for bad files
                failures.append(self._unusable(step, exc, warn))
                continue
            _check_shape_keys(meta, config, self.directory / str(step))
            try:
                state = self._restore_state(step, abstract_state)
            except Exception as exc:  # noqa: BLE001 - likewise
                failures.append(self._unusable(step, exc, warn))
                continue
            if failures:
                self._manager.reload()  # forget the steps moved aside
            return state, meta
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures))

    def _restore_state(self, step: int, abstract_state: Any) -> Any:
        def restore_args(path, leaf):
            # Only the head may change shape (its padding follows the device count).
            return ocp.ArrayRestoreArgs(
                sharding=leaf.sharding,
                global_shape=leaf.shape,
                dtype=leaf.dtype,
                strict=not is_head(path),
            )

        args = jax.tree_util.tree_map_with_path(restore_args, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=args)
            ),
        )
        return restored.state

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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
