"""A process of a multi-process run that stops (kill -9, out of memory, a node failure):
every survivor notices, removes what it owns, says which one in one line, and exits 1.

A heartbeat: every process writes a counter into the coordinator's key-value store each
`interval`; process 0 reads all of them, and when one has not moved for `stale_after`
seconds it writes a verdict naming it, which the others read on their next beat. Each
survivor then releases the output lock, deletes its shared-memory rings and any orbax
temporary folder, prints the line (the lost process, its host, the last complete
checkpoint, what to do) and exits 1, all within `peer_timeout` of the loss. A process
that finishes (or stops on a signal) writes "done" instead, and is no longer watched.

Process 0 holds the key-value store itself, so its loss looks different: the runtime's
error polling fails at once and XLA aborts every other process (LOG(FATAL), exit 134,
a C++ stack dump). jaxlib offers no way around it (the client's missed-heartbeat callback
cannot be given its status argument from Python: std::bad_cast), so a SIGABRT handler
takes over: a coordinator that no longer answers means process 0 is gone. XLA's C++ log
is switched off in multi-process runs so that its dump does not come first (`--debug`
keeps it), and its own heartbeat timeout is set well above `peer_timeout`, so that its
abort on the loss of another process never comes before the verdict.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import jax
from jax._src.lib import utils as jaxlib_utils

from jaxface.data.loader import remove_own_rings
from jaxface.stopping import Stopped

PREFIX = "jaxface/peers/"
DONE = "done"
_NO_CPP_LOG = 1000  # absl::LogSeverityAtLeast::kInfinity: no C++ log line at all
_ABORT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)

_monitor: Monitor | None = None


def xla_heartbeat_timeout(peer_timeout: float) -> int:
    """XLA's own heartbeat timeout: it aborts about 0.85 of it after a loss (measured), so
    twice `peer_timeout` keeps its abort well behind the verdict."""
    return int(2 * peer_timeout + 30)


def start(cfg, client, coordinator: str, debug: bool) -> None:
    """Watch the run's processes from now on (after jax.distributed is up)."""
    global _monitor
    _monitor = Monitor(
        client,
        jax.process_index(),
        jax.process_count(),
        cfg.peer_timeout,
        coordinator,
        Path(cfg.output) / "checkpoints",
    )
    _monitor.start(cfg.distributed_timeout, silence_xla=not debug)


def on_exit(fn) -> None:
    """Run `fn` (quick, local) before exiting for a lost process: `os._exit` runs nothing."""
    if _monitor is not None:
        _monitor.cleanups.append(fn)


@contextlib.contextmanager
def guard():
    """The body of a run. A clean end (or a stop on a signal) tells the others this process
    is done; a runtime error that a lost process caused (a collective whose peer is gone)
    ends in the lost-process line instead of its own traceback."""
    try:
        yield
    except BaseException as exc:
        if _monitor is not None:
            _monitor.failed(exc)
        raise
    if _monitor is not None:
        _monitor.finish()


class Monitor:
    def __init__(self, client, me, count, peer_timeout, coordinator, checkpoints: Path):
        self.client, self.me, self.count = client, me, count
        self.coordinator, self.checkpoints = coordinator, checkpoints
        # Four beats of slack: the judge's half beat, process 0's two beats of waiting
        # for the others to read its verdict, and a beat for exiting fit in peer_timeout.
        self.interval = min(5.0, peer_timeout / 10)
        self.stale_after = peer_timeout - 4 * self.interval
        now = time.monotonic()
        self.seen = {p: ("", now) for p in range(count) if p != me}  # value, when it moved
        self.last_answer = now  # the coordinator's last answer to this process
        self.verdict: list[int] = []
        self.hosts: dict[int, str] = {}
        self.cleanups: list = []
        self.exit_code: int | None = None  # once the run has ended: the status it ends with
        self._stop = threading.Event()
        self._exiting = threading.Lock()

    def start(self, join_timeout: float, silence_xla: bool) -> None:
        self.client.key_value_set(self._alive(self.me), "0")
        self.client.key_value_set(f"{PREFIX}host/{self.me}", socket.gethostname())
        self.client.wait_at_barrier(f"{PREFIX}hosts", int(join_timeout * 1000))
        for key, host in self.client.key_value_dir_get(f"{PREFIX}host/"):
            self.hosts[int(key.rsplit("/", 1)[1])] = host
        self._handler = _ABORT_HANDLER(self._on_abort)  # kept: ctypes frees it otherwise
        libc = ctypes.CDLL(None)
        libc.signal.argtypes = [ctypes.c_int, _ABORT_HANDLER]
        libc.signal.restype = ctypes.c_void_p
        libc.signal(signal.SIGABRT, self._handler)
        if silence_xla:
            jaxlib_utils.absl_set_min_log_level(_NO_CPP_LOG)
        for target in (self._beat, self._judge):
            threading.Thread(target=target, daemon=True, name=f"jaxface-{target.__name__}").start()

    def finish(self, exit_code: int = 0) -> None:
        """Done: the others stop watching this process."""
        self.exit_code = exit_code
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.key_value_set(self._alive(self.me), DONE, allow_overwrite=True)

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, Stopped):
            self.finish(exc.exit_code)
            return
        if isinstance(exc, jax.errors.JaxRuntimeError):
            self._wait_for_verdict()
        self.exit_code = 1
        self._stop.set()  # no more beats: the others see this process stop

    # --- The heartbeat and process 0's verdict.

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self.client.key_value_set(self._alive(self.me), str(count), allow_overwrite=True)
                beats = self._beats(everyone=self.me == 0)
                verdict = self.client.key_value_dir_get(f"{PREFIX}verdict/")
            except Exception:  # noqa: BLE001, S112 - silence is what counts, the error says no more
                pass
            else:
                self.last_answer = time.monotonic()
                self._saw(beats)
                if verdict:
                    self.verdict = [int(p) for p in verdict[0][1].split(",")]
            self._stop.wait(self.interval)

    def _beats(self, everyone: bool) -> list[tuple[int, str]]:
        if everyone:
            found = self.client.key_value_dir_get(f"{PREFIX}alive/")
            return [(int(key.rsplit("/", 1)[1]), value) for key, value in found]
        return [(0, self.client.key_value_try_get(self._alive(0)))]

    def _saw(self, beats) -> None:
        now = time.monotonic()
        for p, value in beats:
            if p in self.seen and self.seen[p][0] != value:
                self.seen[p] = (value, now)

    def _stale(self, after: float) -> list[int]:
        """The watched processes silent for `after` seconds: process 0 watches everyone,
        the others process 0 (a coordinator that stops answering counts as silent)."""
        now = time.monotonic()
        if self.me == 0:
            watched = self.seen
        else:
            value, moved = self.seen[0]
            watched = {0: (value, min(moved, self.last_answer))}
        return [p for p, (value, moved) in watched.items() if value != DONE and now - moved > after]

    def _judge(self) -> None:
        while not self._stop.wait(self.interval / 2):
            if self.verdict:
                self._lost(self.verdict)
            stale = self._stale(self.stale_after)
            if stale:
                self._lost(stale)

    def _wait_for_verdict(self) -> None:
        """After a runtime error: exits if a process is lost, returns once every other
        process has beaten three more times (the error is this process's own)."""
        since, before = time.monotonic(), {p: value for p, (value, _) in self.seen.items()}
        moved: dict[int, int] = dict.fromkeys(before, 0)
        while time.monotonic() - since < self.stale_after + 4 * self.interval:  # peer_timeout
            try:
                beats = self._beats(everyone=True)
            except Exception:  # noqa: BLE001 - a coordinator gone: the judge or the abort says so
                beats = []
            for p, value in beats:
                if p in moved and value != before[p]:
                    moved[p] = 3 if value == DONE else moved[p] + 1
                    before[p] = value
            if all(n >= 3 for n in moved.values()):
                return
            if self.verdict:
                self._lost(self.verdict)
            time.sleep(self.interval)

    # --- Exits.

    def _on_abort(self, signum: int) -> None:
        """XLA is aborting this process (from one of its own threads): say why instead."""
        if self.exit_code is not None:
            # The run has ended and said how (its summary, its error, its signal): an abort
            # while the processes shut down, one of them gone, changes nothing of that.
            os._exit(self.exit_code)
        if self.verdict:
            self._lost(self.verdict)
        if self.me != 0 and not _answers(self.coordinator):
            self._lost([0])
        quiet = self._stale(2 * self.interval)  # XLA saw it first: the best guess
        if quiet:
            self._lost(quiet)
        self._exit(
            "the distributed runtime aborted this process, and no other process is known "
            "to be lost (run again with --debug to see the runtime's message)"
        )

    def _lost(self, processes: list[int]) -> None:
        if self.me == 0 and len(processes) < self.count - 1:
            with contextlib.suppress(Exception):
                self.client.key_value_set(
                    f"{PREFIX}verdict/lost", ",".join(map(str, processes)), allow_overwrite=True
                )
            # The other survivors read the verdict on their next beat; the store ends with us.
            time.sleep(2 * self.interval)
        names = ", ".join(map(str, processes))
        hosts = ", ".join(self.hosts.get(p, "?") for p in processes)
        if len(processes) > 1:
            who, node = f"processes {names} of {self.count} (hosts {hosts})", "their nodes"
        else:
            role = ", the coordinator" if processes == [0] else ""
            who, node = f"process {names} of {self.count} (host {hosts}{role})", "its node"
        self._exit(
            f"{who} stopped answering (killed, out of memory, or {node} failed), so this "
            f"process ({self.me}) stops too"
        )

    def _exit(self, what: str) -> None:
        if not self._exiting.acquire(blocking=False):
            self._exiting.acquire()  # another thread is already exiting: wait for it
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        with contextlib.suppress(Exception):
            remove_own_rings()
        for partial in self.checkpoints.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        last = _last_checkpoint(self.checkpoints)
        then = (
            f"the last complete checkpoint is {last}: start every process again with "
            "--config.resume=true"
            if last
            else "no checkpoint was saved yet: start every process again"
        )
        # os.write, not print: this may run inside a signal handler, or while another
        # thread holds sys.stderr's lock.
        os.write(2, f"jaxface.train: error: {what}; {then}\n".encode())
        os._exit(1)

    @staticmethod
    def _alive(p: int) -> str:
        return f"{PREFIX}alive/{p}"


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint orbax finished (renamed from its temporary folder)."""
    with contextlib.suppress(OSError):
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
        return folder / str(max(steps)) if steps else None
    return None


def _answers(address: str, tries: int = 5) -> bool:
    """Whether the coordinator still takes connections. Asked a few times: a process being
    killed may still accept one while its other sockets close (which is what aborted us)."""
    host, _, port = address.rpartition(":")
    for _ in range(tries):
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                pass
        except (OSError, ValueError):
            return False
        time.sleep(0.3)
    return True
