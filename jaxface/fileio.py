"""Files written whole, and PyTorch files read as data. numpy only at import.

Every file jaxface writes goes to a temporary name in the same folder and is renamed when
complete, so a reader (or a run stopped half-way) never sees half a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


class ConvertError(ValueError):
    """A weights file or state dict that cannot be read or converted; the message names it."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """`write(file object)` into `path` through a temporary name renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def refuse_existing(path: str | Path) -> Path:
    """`path` as a new output: an existing file is the user's and is never replaced."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it (remove it or choose another name)"
        )
    return path


def import_torch():
    """torch, an optional extra (`.[torch]`): only `.pt` files need it."""
    try:
        import torch
    except ImportError:
        raise ConvertError(
            "reading or writing PyTorch files needs torch: pip install -e '.[torch]'"
        ) from None
    return torch


def torch_load(path: str | Path) -> Any:
    """A PyTorch file's object, read as data only."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{str(path)!r} does not exist")
    torch = import_torch()
    try:
        # weights_only: a checkpoint is data; never run pickled code from a downloaded file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a non-checkpoint
        # torch's own text is a page long, and suggests weights_only=False, which would run
        # pickled code: name the failure only.
        raise ConvertError(
            f"{str(path)!r} is not a PyTorch checkpoint (torch.load failed: {type(exc).__name__})"
        ) from None


def torch_save(obj: Any, path: str | Path) -> Path:
    torch = import_torch()
    return atomic_write(path, lambda f: torch.save(obj, f))
