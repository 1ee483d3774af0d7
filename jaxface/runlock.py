"""One run per output folder: a lock held for the life of the run.

`OUTPUT/.jaxface.lock` is locked with flock (the kernel drops the lock when the holder
dies, however it dies) and holds the holder's host, pid and start time, so a second run
can say who has the folder. A lock file left by a dead process is taken over, with a
warning naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".jaxface.lock"


class FolderLockedError(RuntimeError):
    """Another live run holds the output folder; the message names it."""


class RunLock:
    """Hold `folder`'s lock until release(); raise FolderLockedError if another run has it."""

    def __init__(self, folder: str | Path, warn=print):
        self.path = Path(folder) / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise FolderLockedError(
                f"output folder {self.path.parent} is in use by another run ({holder}); "
                "wait for it, stop it, or give this run another config key 'output'"
            ) from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            warn(
                f"warning: taking over the lock of {self.path.parent} left by a run that is "
                f"no longer running ({_describe(previous)})"
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to report
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"
