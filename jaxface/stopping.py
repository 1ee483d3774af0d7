"""Stopping on request: SIGTERM (SLURM, Kubernetes, `timeout`), SIGINT (Ctrl-C) and
SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the time limit).

The first signal asks the run to stop after the step in progress; the trainer then saves
a checkpoint of that step and exits. A watchdog bounds the whole stop: if it takes longer
than `grace_s` (a step that never finishes, a stuck save), the process exits anyway. A
second signal exits at once. Exit statuses are the shell's convention, 128 + the signal
number (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), so that a scheduler sees a
stopped run, and a batch script can tell the time-limit warning (138: requeue) from a
cancellation (143).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Stopped(Exception):
    """The run stopped on a signal after saving its state; `exit_code` is 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Installs the handlers while active (a context manager); `signum` is set once asked."""

    def __init__(self, grace_s: float, say=print):
        self.grace_s = grace_s
        self.say = say
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._exit_now(signum, "a second signal")
        self.signum = signum
        self.say(
            f"{signal.Signals(signum).name}: stopping after the step in progress, saving a "
            f"checkpoint first (at most {self.grace_s:.0f} s; a second signal stops at once)"
        )
        timer = threading.Timer(self.grace_s, self._exit_now, (signum, "the grace period"))
        timer.daemon = True
        timer.start()

    def _exit_now(self, signum: int, why: str) -> None:
        print(
            f"jaxface.train: stopped by {why} without saving; resume with "
            "--config.resume=true (or auto) from the last complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)
