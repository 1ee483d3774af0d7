"""A process of a two-process run killed with SIGKILL (a node failure, the OOM killer): the
survivor stops within `peer_timeout` with one line naming the lost process and the last
complete checkpoint, exit 1, nothing left behind; the job resumes from that checkpoint on
one process of 8 devices."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest

from jaxface import peers
from jaxface.data.loader import RING_PREFIX, remove_stale_rings
from jaxface.peers import DONE, Monitor
from jaxface.runlock import LOCK_NAME

PEER_TIMEOUT = 10
# One CPU device a process: an 8-device program compiles 2.5x slower, and the global
# batch, kept at 16, is what a resume on 8 devices must find unchanged.
RUN = dict(num_classes=12, num_image=4000, global_batch_size=16, embedding_size=16, frequent=1,
           val_targets="[]", progress="plain", warmup_epoch=0, max_steps=1000,
           tensorboard="false", checkpoint_every=1, rec="synthetic", pack_synthetic="false",
           peer_timeout=PEER_TIMEOUT)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One compilation cache for this module's runs: after the first, each loads the train
    step instead of compiling it again (most of a run's time on a busy machine)."""
    return tmp_path_factory.mktemp("jax-cache")


def _env(devices: int, cache: Path) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip


def _train(repo, cache, out, devices, **overrides):
    values = {**RUN, "output": str(out), **overrides}
    argv = [sys.executable, "-m", "jaxface.train", "--config", "configs/demo.py"]
    argv += [f"--config.{k}={v}" for k, v in values.items()]
    return subprocess.Popen(argv, cwd=repo, env=_env(devices, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _pair(repo, cache, out, **overrides):
    port = _free_port()
    return [
        _train(repo, cache, out, 1, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
               process_id=i, **overrides)
        for i in range(2)
    ]  # fmt: skip


def _first_checkpoint(procs, folder: Path, timeout=240) -> Path:
    deadline = time.time() + timeout
    while True:
        done = [p for p in folder.glob("*") if p.name.isdigit()] if folder.exists() else []
        if done:
            return done[0]
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _kill_one(repo, cache, tmp_path, victim: int, **overrides):
    """Both processes up, the first checkpoint written, `victim` killed: the survivor's
    (exit status, seconds it took, stderr, rings it left, its decode workers)."""
    out = tmp_path / "run"
    procs = _pair(repo, cache, out, **overrides)
    _first_checkpoint(procs, out / "checkpoints")
    survivor = procs[1 - victim]
    workers = _children(survivor.pid)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        _, err = survivor.communicate(timeout=PEER_TIMEOUT + 30)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    took = time.time() - killed
    left = [p for d in ("/dev/shm", "/tmp") for p in Path(d).glob(f"{RING_PREFIX}{survivor.pid}-*")]
    remove_stale_rings()  # the killed process's (SIGKILL runs nothing), as a next loader does
    return survivor.returncode, took, err, left, workers


def _check_one_line(err: str, lost: int, took: float, out: Path):
    print(f"process {lost} killed: the survivor exited {took:.1f} s later")  # with -s
    assert took < PEER_TIMEOUT, (took, err[-3000:])
    assert "Traceback" not in err and "Check failure" not in err and "@ 0x" not in err, err
    lines = [x for x in err.splitlines() if "stopped answering" in x]
    assert len(lines) == 1, err[-3000:]
    host = socket.gethostname()
    assert f"process {lost} of 2 (host {host}" in lines[0], lines[0]
    assert "--config.resume=true" in lines[0]
    checkpoints = out / "checkpoints"
    last = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert f"the last complete checkpoint is {checkpoints / str(last)}:" in lines[0], lines[0]
    assert not list(checkpoints.glob("*.orbax-checkpoint-tmp*"))  # no half-written one
    return last


@pytest.mark.multiprocess
def test_killed_process_1_stops_process_0_with_one_line_and_the_job_resumes(repo, cache, tmp_path):
    out = tmp_path / "run"
    code, took, err, rings, workers = _kill_one(repo, cache, tmp_path, victim=1, num_workers=1)
    assert code == 1, err[-3000:]
    last = _check_one_line(err, 1, took, out)
    # Nothing of the survivor's left: its decode worker, its ring, its lock's holder.
    assert workers and all(_gone(w) for w in workers)  # they exit with their parent
    assert not rings
    assert (out / LOCK_NAME).read_text() == ""
    # The job goes on from that checkpoint on one process of 8 devices: every array read
    # back into the new mesh. No step is run: a 1 x 8 program would be compiled afresh (half
    # a minute here), and tests/test_resume.py shows a restored state trains as it would have.
    one = _train(repo, cache, out, 8, resume="true", max_steps=last)
    stdout, stderr = one.communicate(timeout=300)
    assert one.returncode == 0, stderr[-3000:]
    said = stdout + stderr
    where = out / "checkpoints" / str(last)
    assert f"resumed from {where} (step {last}, saved on 2 device(s), now 8)" in said, said


@pytest.mark.multiprocess
def test_killed_coordinator_stops_process_1_with_one_line(repo, cache, tmp_path):
    code, took, err, _, _ = _kill_one(repo, cache, tmp_path, victim=0, num_workers=0)
    assert code == 1, err[-3000:]
    _check_one_line(err, 0, took, tmp_path / "run")
    assert "the coordinator" in err


def _gone(pid: int, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def guard_of(monitor: Monitor, monkeypatch):
    """peers.guard() with `monitor` as the process's own (for this test only)."""
    monkeypatch.setattr(peers, "_monitor", monitor)
    return peers.guard()


class _Store:
    """The coordinator's key-value store, in memory, as the runtime client offers it."""

    def __init__(self):
        self.kv = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.kv[key] = value

    def key_value_dir_get(self, folder):
        return [(k, v) for k, v in list(self.kv.items()) if k.startswith(folder)]

    def key_value_try_get(self, key):
        return self.kv[key]


def _monitors(count: int) -> tuple[list[Monitor], dict[int, str]]:
    """`count` monitors on one store, beating fast; what each would print on exiting."""
    store, said = _Store(), {}
    monitors = [Monitor(store, me, count, 5, "127.0.0.1:1", Path("/nonexistent")) for me in
                range(count)]  # fmt: skip
    for m in monitors:
        m.interval, m.stale_after = 0.05, 0.5
        m.hosts = {p: f"node{p}" for p in range(count)}
        store.key_value_set(m._alive(m.me), "0")

        def _exit(what, m=m):
            said[m.me] = what
            m._stop.set()  # its threads end, as os._exit would end the process

        m._exit = _exit
        for target in (m._beat, m._judge):
            threading.Thread(target=target, daemon=True).start()
    return monitors, said


def test_every_survivor_names_the_lost_process_and_a_finished_one_is_not_lost():
    """Three processes: the one that stops beating is named by process 0's verdict on
    every survivor; one that finished (wrote "done") is never reported."""
    monitors, said = _monitors(3)
    monitors[2]._stop.set()  # killed: no more beats
    deadline = time.time() + 10
    while len(said) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert set(said) == {0, 1}
    for me in (0, 1):
        assert said[me].startswith("process 2 of 3 (host node2) stopped answering"), said[me]
        assert f"so this process ({me}) stops too" in said[me]
    monitors, said = _monitors(3)
    monitors[2].finish()
    assert monitors[2]._stop.is_set() and monitors[0].client.kv["jaxface/peers/alive/2"] == DONE
    time.sleep(1.5)  # three times stale_after
    assert said == {}
    for m in monitors:
        m._stop.set()


def test_a_collective_error_waits_for_the_verdict_or_is_the_process_own(monkeypatch):
    """A collective that fails (instead of waiting) because a process is lost ends in the
    lost-process line; with every process beating, the error is this process's own."""
    monitors, said = _monitors(3)
    monitors[2]._stop.set()
    time.sleep(0.2)  # the collective notices later than the kill
    with pytest.raises(jax.errors.JaxRuntimeError), guard_of(monitors[1], monkeypatch):
        raise jax.errors.JaxRuntimeError("UNAVAILABLE: connection reset by peer")
    assert said[1].startswith("process 2 of 3 (host node2) stopped answering"), said
    monitors, said = _monitors(3)
    for m in monitors:
        m.stale_after = 5.0  # the wait's bound: returning well before it is the beats' doing
    start = time.time()
    with pytest.raises(jax.errors.JaxRuntimeError), guard_of(monitors[1], monkeypatch):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
    assert said == {} and time.time() - start < 3
    assert monitors[1].exit_code == 1 and monitors[1]._stop.is_set()
    for m in monitors:
        m._stop.set()
