"""Room for checkpoints: a filesystem too small for one is refused at start-up, and a save
that fails for lack of space (or quota) is recognised, whatever wraps the error.

A checkpoint holds every array of the train state once (orbax writes them uncompressed
into OCDBT files, plus a few KB of metadata), so its size is known before training: the
sum of the arrays' bytes.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxface.config import ConfigError

DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is full"}
# tensorstore reports a failed write as a ValueError whose text ends in
# "No space left on device [os_error_code='28']": no OSError to look at.
_TEXTS = {
    errno.ENOSPC: ("No space left on device", f"os_error_code='{errno.ENOSPC}'"),
    errno.EDQUOT: ("Disk quota exceeded", f"os_error_code='{errno.EDQUOT}'"),
}


def disk_full(exc: BaseException | None) -> str | None:
    """What ran out ("no space left on the device", "the disk quota is full") when `exc`,
    or an exception it was raised from, is a write that failed for lack of space; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return DISK_FULL[exc.errno]
        text = str(exc)
        for code, marks in _TEXTS.items():
            if any(mark in text for mark in marks):
                return DISK_FULL[code]
        exc = exc.__cause__ or exc.__context__
    return None


def tree_bytes(tree) -> int:
    """Bytes of every array in `tree` (arrays or ShapeDtypeStructs): one checkpoint's size."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the filesystem of `folder` (or of its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def ensure_room(folder: str | Path, needed: int, output: str) -> None:
    """Refuse (ConfigError, exit 2) a run whose checkpoint folder cannot hold one
    checkpoint of `needed` bytes: found at start-up, not hours later at the first save."""
    free = free_bytes(folder)
    if free < needed:
        raise ConfigError(
            f"config key 'output'={output!r}: the filesystem of {folder} has "
            f"{format_bytes(free)} free, but one checkpoint of this run needs "
            f"{format_bytes(needed)} ({needed:,} bytes, the train state's arrays); free space "
            "there or choose an output folder on a larger filesystem"
        )
