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

import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Keys whose values fix the shapes in the state: a checkpoint must agree on them.
SHAPE_KEYS = ("network", "embedding_size", "num_classes", "optimizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says which and why."""


def _is_head(path) -> bool:
    return any(getattr(k, "key", None) == "head" for k in path)


class Checkpointer:
    """Saves every `every` steps (and when asked), keeps the last `keep`, restores the latest."""

    def __init__(self, directory: str | Path, keep: int, asynchronous: bool = True):
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

    def restore(self, abstract_state: Any, config: dict) -> tuple[Any, dict]:
        """The latest checkpoint, placed in `abstract_state`'s shardings, and its meta.

        Raises CheckpointError if there is none or it was written for another model."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(
                f"config key 'resume'=True, but {self.directory} holds no checkpoint; "
                "start without --config.resume=true"
            )
        meta = self.read_meta(step)
        saved = meta.get("config", {})
        for key in SHAPE_KEYS:
            if key in saved and saved[key] != config[key]:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} was written for "
                    f"{key}={saved[key]!r}, but the config says {key}={config[key]!r}"
                )

        def restore_args(path, leaf):
            # Only the head may change shape (its padding follows the device count).
            return ocp.ArrayRestoreArgs(
                sharding=leaf.sharding,
                global_shape=leaf.shape,
                dtype=leaf.dtype,
                strict=not _is_head(path),
            )

        args = jax.tree_util.tree_map_with_path(restore_args, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=args)
                ),
            )
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this run's state: {exc}"
            ) from exc
        return restored.state, meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def set_aside(directory: str | Path) -> Path | None:
    """Moves an existing checkpoint folder out of the way (a fresh run never overwrites)."""
    directory = Path(directory)
    if not directory.exists() or not any(directory.iterdir()):
        return None
    target = directory.with_name(f"{directory.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    directory.rename(target)
    return target
