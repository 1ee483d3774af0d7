"""Partial FC heads between arcface_torch and jaxface, any device count on either side.

arcface_torch keeps one file per rank (`checkpoint_gpu_{rank}.pt`, the rank's block of
class centres under `state_dict_softmax_fc` / `weight`), split unevenly: the first C mod W
ranks own one class more (`partial_fc.py`'s `num_local`/`class_start`). jaxface keeps ONE
global matrix [C_padded, E], C_padded = ceil(C / D) * D, padding rows zero, and saves the
real rows only (`save_head`), so a head can be padded again for any device count.

numpy only (torch where a `.pt` is read or written): torchref uses the split too.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxface.convert import as_numpy, listing
from jaxface.fileio import (
    ConvertError,
    atomic_write,
    import_torch,
    refuse_existing,
    torch_load,
    torch_save,
)


def load_head_shards(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Per-rank class-centre blocks, in rank order, from arcface_torch files.

    `paths` may be one directory (every `checkpoint_gpu_{rank}.pt` in it) or the files. A
    file holds a training checkpoint (`state_dict_softmax_fc` -> `weight`), a head state
    dict (`weight`) or a bare tensor.
    """
    files = [Path(p) for p in paths]
    if len(files) == 1 and files[0].is_dir():
        folder = files[0]
        found = {}
        for f in folder.glob("checkpoint_gpu_*.pt"):
            m = re.fullmatch(r"checkpoint_gpu_(\d+)\.pt", f.name)
            if m:
                found[int(m.group(1))] = f
        if not found:
            raise ConvertError(f"{str(folder)!r} holds no checkpoint_gpu_{{rank}}.pt files")
        gaps = sorted(set(range(max(found) + 1)) - set(found))
        if gaps:
            raise ConvertError(
                f"{str(folder)!r}: head shards of ranks {gaps} are missing (found {sorted(found)})"
            )
        files = [found[r] for r in range(len(found))]
    shards = []
    for f in files:
        obj = torch_load(f)
        for key in ("state_dict_softmax_fc", "softmax_fc", "partial_fc"):
            if isinstance(obj, Mapping) and key in obj:
                obj = obj[key]
                break
        if isinstance(obj, Mapping):
            if "weight" not in obj:
                raise ConvertError(f"{str(f)!r} has no head weight (keys: {listing(sorted(obj))})")
            obj = obj["weight"]
        if not hasattr(obj, "shape") or len(obj.shape) != 2:
            raise ConvertError(f"{str(f)!r}: the head weight is not a [classes, E] matrix")
        shards.append(as_numpy(obj))
    return shards


def split_sizes(num_classes: int, world_size: int) -> list[int]:
    """arcface_torch's uneven split: the first C mod W ranks own one class more."""
    base, extra = divmod(num_classes, world_size)
    return [base + int(r < extra) for r in range(world_size)]


def shards_to_centres(
    shards: Sequence[np.ndarray], num_classes: int, num_devices: int
) -> np.ndarray:
    """arcface_torch per-rank blocks -> jaxface's global centres [C_padded, E] for
    `num_devices` devices (padding rows zero)."""
    sizes = [s.shape[0] for s in shards]
    total = sum(sizes)
    if total != num_classes:
        raise ConvertError(
            f"the head has {total} classes ({len(shards)} shards of {sizes}), "
            f"but the config says num_classes={num_classes}"
        )
    expected = split_sizes(num_classes, len(shards))
    if sizes != expected:
        raise ConvertError(
            f"head shard sizes {sizes} are not arcface_torch's split of {num_classes} classes "
            f"over {len(shards)} ranks ({expected}); are the files in rank order?"
        )
    dims = {s.shape[1] for s in shards}
    if len(dims) != 1:
        raise ConvertError(f"head shards disagree on the embedding size: {sorted(dims)}")
    return pad_centres(np.concatenate(shards), num_classes, num_devices)


def pad_centres(centres: np.ndarray, num_classes: int, num_devices: int) -> np.ndarray:
    """[C or more, E] -> [ceil(C / D) * D, E], rows from C on zero."""
    padded = -(-num_classes // num_devices) * num_devices
    out = np.zeros((padded, centres.shape[1]), centres.dtype)
    out[:num_classes] = centres[:num_classes]
    return out


def centres_to_shards(centres: np.ndarray, num_classes: int, world_size: int) -> list[np.ndarray]:
    """jaxface's global centres [C_padded, E] (any padding) -> arcface_torch's per-rank
    blocks for `world_size` ranks."""
    if centres.ndim != 2 or centres.shape[0] < num_classes:
        raise ConvertError(
            f"centres of shape {list(centres.shape)} cannot hold num_classes={num_classes}"
        )
    if np.any(centres[num_classes:]):
        raise ConvertError(
            f"centres have non-zero rows beyond num_classes={num_classes}: "
            "the class count does not match this head"
        )
    bounds = np.cumsum([0, *split_sizes(num_classes, world_size)])
    return [
        np.ascontiguousarray(centres[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def save_head_shards(
    shards: Sequence[np.ndarray],
    folder: str | Path,
    backbone_state_dict: Mapping[str, np.ndarray] | None = None,
    global_step: int = 0,
) -> list[Path]:
    """Write `checkpoint_gpu_{rank}.pt` files in arcface_torch's layout (no optimizer state:
    resuming there starts its momentum from zero)."""
    torch = import_torch()
    folder = Path(folder)
    for rank in range(len(shards)):
        refuse_existing(folder / f"checkpoint_gpu_{rank}.pt")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, shard in enumerate(shards):
        ckpt: dict[str, Any] = {
            "epoch": 0,
            "global_step": global_step,
            "state_dict_softmax_fc": {"weight": torch.from_numpy(np.array(shard))},
        }
        if backbone_state_dict is not None:
            ckpt["state_dict_backbone"] = {
                k: torch.from_numpy(np.array(v)) for k, v in backbone_state_dict.items()
            }
        path = folder / f"checkpoint_gpu_{rank}.pt"
        paths.append(torch_save(ckpt, path))
    return paths


def save_head(path: str | Path, centres: np.ndarray, num_classes: int) -> None:
    """jaxface head -> `.npz` with the real classes only ([C, E]) and num_classes, so it can
    be padded for any device count on load."""
    real = np.asarray(centres)[:num_classes]
    atomic_write(path, lambda f: np.savez(f, centres=real, num_classes=np.array(num_classes)))


def load_head(path: str | Path, num_classes: int, num_devices: int) -> np.ndarray:
    """`.npz` from save_head -> centres [C_padded, E] for `num_devices` devices."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            centres, stored = data["centres"], int(data["num_classes"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ConvertError(f"{str(path)!r} is not a jaxface head file: {exc}") from None
    if stored != num_classes:
        raise ConvertError(
            f"{str(path)!r} holds {stored} classes, but the config says num_classes={num_classes}"
        )
    return pad_centres(centres, num_classes, num_devices)
