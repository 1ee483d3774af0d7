"""Faults a long run meets, as they really happen: real signals to real processes, files
damaged on disk, RecordIO laid out as other tools write it, two runs on one folder.
docs/faults.md lists each fault, what jaxface does, and the test here that proves it."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxface.config import ConfigError, load_config
from jaxface.data.decode import encode_jpeg
from jaxface.data.loader import RING_PREFIX, HostLoader, LoaderError, remove_stale_rings
from jaxface.data.pack import pack_folder, pack_records
from jaxface.data.recordio import RecordIOWriter, pack_payload
from jaxface.data.sources import SyntheticDataset, open_recordio
from jaxface.data.training import prepare
from jaxface.runlock import LOCK_NAME, RunLock
from jaxface.train import main, train

RUN = dict(
    num_classes=12, num_image=4000, batch_size=4, embedding_size=32, frequent=1,
    val_targets="[]", progress="plain", warmup_epoch=0, lr=0.1, checkpoint_every=2,
    tensorboard=False, rec="synthetic", pack_synthetic=False, num_workers=0, num_devices=1,
)  # fmt: skip


def _cfg(repo, out, **overrides):
    values = {**RUN, "output": str(out), **overrides}
    return load_config(repo / "configs/demo.py", {k: str(v) for k, v in values.items()})


def _argv(cfg):
    return ["--config", "configs/demo.py", *[f"--config.{k}={v}" for k, v in cfg.to_dict().items()]]


def _losses(summary):
    return {r["step"]: r["loss"] for r in summary["history"]}


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc: no psutil needed)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pids, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.2)
    return False


def _rings(pid: int) -> list[Path]:
    return [p for d in ("/dev/shm", "/tmp") for p in Path(d).glob(f"{RING_PREFIX}{pid}-*")]


def _start(repo, cfg, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxface.train", *_argv(cfg), *extra],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_step(proc, out: Path, step: int, timeout=300):
    deadline = time.time() + timeout
    while True:
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()]
            if steps and max(steps) >= step:
                return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not reach the step in time"
        time.sleep(0.1)


# --- 1. Never overwrite the user's dataset -------------------------------------------


def _user_rec(folder: Path) -> Path:
    items = [(encode_jpeg(np.full((112, 112, 3), i * 9, np.uint8)), i // 2) for i in range(6)]
    return pack_records(folder / "train", items).rec


@pytest.mark.parametrize("form", ["folder", "prefix", "rec"])
def test_synthetic_packing_never_touches_user_data(repo, tmp_path, form):
    rec = _user_rec(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in rec.parent.iterdir()}
    value = {"folder": rec.parent, "prefix": rec.with_suffix(""), "rec": rec}[form]
    cfg = _cfg(repo, tmp_path / "run", rec=value, pack_synthetic=True)
    with pytest.raises(ConfigError, match=r"train\.(rec|idx) exists and was not written by"):
        prepare(cfg)
    assert main(_argv(cfg)) == 2
    after = {p.name: p.read_bytes() for p in rec.parent.iterdir()}
    assert after == before  # no byte changed, no x.rec.rec or other file appeared
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written for a bad start


def test_a_folder_of_photos_is_never_filled_with_synthetic_data(repo, tmp_path):
    """The demo config pointed at a folder of the user's own JPEGs (no train.rec): it used
    to pack 180 MB of synthetic identities into it and train on them."""
    photos = tmp_path / "MYFACES"
    photos.mkdir()
    for i in range(3):
        (photos / f"IMG_{i}.jpg").write_bytes(encode_jpeg(np.full((112, 112, 3), i, np.uint8)))
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    cfg = _cfg(repo, tmp_path / "run", rec=photos, pack_synthetic=True)
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    message = str(err.value)
    assert f"{photos} holds 3 file(s) jaxface did not write (IMG_0.jpg, IMG_1.jpg" in message
    assert "set pack_synthetic=false" in message
    assert main(_argv(cfg)) == 2
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    # An empty folder is where synthetic data was asked for: packed there.
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(_cfg(repo, tmp_path / "run2", rec=empty, pack_synthetic=True, num_classes=2,
                 num_image=4))  # fmt: skip
    assert (empty / "train.rec").exists()


def test_synthetic_pack_is_marked_reused_and_repacked_with_a_message(repo, tmp_path):
    said = []
    cfg = _cfg(repo, tmp_path / "run", rec=tmp_path / "syn" / "train", pack_synthetic=True,
               num_classes=4, num_image=8)  # fmt: skip
    prepare(cfg, said.append)
    stamp = json.loads((tmp_path / "syn" / "train.synthetic.json").read_text())
    assert stamp["generator"] == "jaxface.data.pack.pack_synthetic" and stamp["num_classes"] == 4
    assert any("packing 4 synthetic identities" in s for s in said)
    assert any("packed 4/4 identities" in s and "ETA" in s for s in said)  # progress
    said.clear()
    prepare(cfg, said.append)
    assert said == []  # same parameters: reused, silently
    prepare(cfg.replace(num_classes=2), said.append)
    assert any("repacking" in s and "num_classes 4 -> 2" in s for s in said)
    assert len(open_recordio(tmp_path / "syn" / "train.rec")) == 2 * 4


def test_a_failed_pack_leaves_nothing(tmp_path):
    src = tmp_path / "faces"
    (src / "a").mkdir(parents=True)
    (src / "a" / "0.jpg").write_bytes(encode_jpeg(np.zeros((112, 112, 3), np.uint8)))
    (src / "a" / "1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="1.jpg"):
        pack_folder(src, tmp_path / "out" / "train")
    assert list((tmp_path / "out").iterdir()) == []  # no half-written .rec/.idx, no temp
    rec = _user_rec(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pack_folder(src, rec.with_suffix(""))


# --- 2. RecordIO as InsightFace's own tools lay it out -------------------------------


def _images(n):
    return [encode_jpeg(np.full((112, 112, 3), 20 * i, np.uint8)) for i in range(n)]


@pytest.mark.parametrize("order", ["header_first", "rec_builder", "face2rec2"])
def test_header_record_is_read_by_key_wherever_it_lies(tmp_path, order):
    """rec_builder writes the header (key 0) after every image and identity record;
    face2rec2 between the images and the identity records. The index lists records in
    the order written, as mxnet's MXIndexedRecordIO does."""
    jpegs, labels = _images(5), [0, 0, 1, 1, 1]
    images = [(k + 1, pack_payload(float(lab), j, id=k + 1))
              for k, (j, lab) in enumerate(zip(jpegs, labels, strict=True))]  # fmt: skip
    identities = [(6, pack_payload([1.0, 3.0], b"", id=6)), (7, pack_payload([3.0, 6.0], b"", 7))]
    header = [(0, pack_payload([6.0, 8.0], b""))]
    records = {
        "header_first": header + images + identities,
        "rec_builder": images + identities + header,
        "face2rec2": images + header + identities,
    }[order]
    with RecordIOWriter(tmp_path / "train.rec") as writer:
        for key, payload in records:
            writer.write(key, payload)
    idx_keys = [
        int(line.split("\t")[0]) for line in (tmp_path / "train.idx").read_text().split()[::2]
    ]
    assert idx_keys == [k for k, _ in records]  # the line order is the writing order
    ds = open_recordio(tmp_path / "train.rec")
    assert (len(ds), ds.num_classes, ds.header) == (5, 2, (6, 8))
    assert ds.labels().tolist() == labels
    for i in range(5):
        image, label = ds[i]
        assert label == labels[i] and abs(int(image.mean()) - 20 * i) <= 2


# --- 3, 4. Signals and dead processes -------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_saves_the_last_step_and_resume_equals_an_uninterrupted_run(repo, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(repo, out, checkpoint_every=0, num_workers=2)
    proc = _start(repo, cfg, "--config.max_steps=400")
    _wait_for_step(proc, out, 3)
    workers = _children(proc.pid)
    assert workers, "the run should have decode workers"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    stopped = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert (out / "checkpoints" / str(stopped)).is_dir()
    assert _gone(workers) and not _rings(proc.pid)  # no orphans, no /dev/shm ring
    assert not list((out / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    end = stopped + 2
    resumed = train(_cfg(repo, out, checkpoint_every=0, resume=True, max_steps=end))
    straight = train(_cfg(repo, tmp_path / "straight", checkpoint_every=0, max_steps=end))
    for step in (stopped + 1, end):
        assert _losses(resumed)[step] == pytest.approx(_losses(straight)[step], rel=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_of_the_trainer_takes_its_workers_and_the_next_run_cleans_up(repo, tmp_path):
    out = tmp_path / "run"
    proc = _start(
        repo, _cfg(repo, out, checkpoint_every=0, num_workers=2), "--config.max_steps=400"
    )
    _wait_for_step(proc, out, 2)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers and _gone(workers, timeout=15)  # they notice their parent is gone
    leftover = _rings(proc.pid)
    removed = remove_stale_rings()  # what every new loader does first
    assert set(leftover) <= set(removed) and not _rings(proc.pid)
    # The killed run's lock is stale: the next run takes it over with a warning.
    warned = []
    RunLock(out, warn=warned.append).release()
    assert warned and f"pid {proc.pid}" in warned[0]


class _Dies:
    """Kills the worker that loads image `index` (each time, or only in the first worker)."""

    def __init__(self, index: int, always: bool, flag: Path):
        self.data = SyntheticDataset(4, 64, seed=1)
        self.num_classes, self.index, self.always, self.flag = 4, index, always, flag

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.index and (self.always or not self.flag.exists()):
            self.flag.write_text("died once")
            os._exit(3)
        return self.data[i]


@pytest.mark.slow
def test_a_killed_decode_worker_is_replaced_and_the_batches_are_the_same(tmp_path):
    inline = HostLoader(SyntheticDataset(4, 64, seed=1), 16, seed=5)
    index = int(inline.indices(1)[3])
    dying = HostLoader(_Dies(index, False, tmp_path / "f"), 16, seed=5, workers=2)
    with pytest.warns(UserWarning, match="restarted the workers"), dying as ld:
        for step in range(4):
            got = ld.batch(step)
            np.testing.assert_array_equal(got[0], inline.batch(step)[0])
            np.testing.assert_array_equal(got[1], inline.batch(step)[1])
        assert ld.restarts == 1


def test_a_worker_that_keeps_dying_stops_the_loader_with_a_message(tmp_path):
    dying = HostLoader(_Dies(0, True, tmp_path / "f"), 64, seed=5, workers=1)
    with dying as ld, pytest.warns(UserWarning), pytest.raises(LoaderError, match="a decode"):
        ld.batch(0)


# --- 5. Damaged checkpoints ------------------------------------------------------------


def _damage(step_dir: Path) -> Path:
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    return biggest


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(repo, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(_cfg(repo, out, max_steps=4))
    _damage(out / "checkpoints" / "4")
    capsys.readouterr()
    resumed = train(_cfg(repo, out, max_steps=6, resume=True))
    text = capsys.readouterr().out
    assert "warning: checkpoint step 4" in text and "cannot be read" in text
    assert "resumed from" in text and "(step 2," in text
    assert list((out / "checkpoints").glob("4.damaged-*"))  # set aside, not deleted
    assert _losses(resumed)[3] == pytest.approx(_losses(first)[3], rel=1e-6)
    for step_dir in (out / "checkpoints").iterdir():
        if step_dir.name.isdigit():  # 2, and the 4 and 6 the resumed run wrote
            _damage(step_dir)
    assert main(_argv(_cfg(repo, out, max_steps=8, resume=True))) == 1
    assert "no usable checkpoint in" in capsys.readouterr().err


# --- 6, 7, 9. One run per folder; config against data; paths --------------------------


def test_a_second_run_on_a_locked_folder_refuses(repo, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out)
    try:
        assert main(_argv(_cfg(repo, out, max_steps=1))) == 2
    finally:
        held.release()
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert (out / LOCK_NAME).exists() and not (out / "config.json").exists()


def test_config_is_checked_against_the_data(repo, tmp_path, capsys):
    rec = _user_rec(tmp_path / "data")  # 6 images, 3 identities
    cfg = _cfg(repo, tmp_path / "run", rec=rec.parent, num_classes=2, num_image=6, max_steps=1)
    assert main(_argv(cfg)) == 2
    assert "config key 'num_classes'=2, but" in capsys.readouterr().err
    assert main(_argv(cfg.replace(num_classes=3, num_image=48))) == 2
    assert "config key 'num_image'=48, but" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_refuses_a_different_data_stream_unless_allowed(repo, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(repo, out, max_steps=2))
    assert main(_argv(_cfg(repo, out, max_steps=4, resume=True, batch_size=8))) == 2
    assert "global_batch 4 -> 8" in capsys.readouterr().err
    summary = train(_cfg(repo, out, max_steps=3, resume=True, seed=7, allow_data_change=True))
    assert "warning: the data stream changed on resume (seed 2048 -> 7)" in capsys.readouterr().out
    assert list(_losses(summary)) == [3]


def test_output_paths_are_checked_before_writing(repo, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoints go")
    assert main(_argv(_cfg(repo, out, max_steps=1))) == 2
    assert "checkpoints is a file, not a folder" in capsys.readouterr().err
    missing = _cfg(repo, tmp_path / "other", rec=tmp_path / "nowhere" / "train.rec", max_steps=1)
    assert main(_argv(missing)) == 2
    assert not (tmp_path / "other").exists()


# --- 8. Multi-host start-up ------------------------------------------------------------


def test_many_processes_need_a_coordinator(repo):
    with pytest.raises(ConfigError, match="'num_processes'=2 needs 'coordinator_address'"):
        load_config(repo / "configs/demo.py", {"num_processes": "2"})


@pytest.mark.multiprocess
def test_process_zero_without_its_peer_fails_in_bounded_time_with_one_line(repo, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(repo, tmp_path / "run", max_steps=1, coordinator_address=f"127.0.0.1:{port}",
               num_processes=2, process_id=0, distributed_timeout=5)  # fmt: skip
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "jaxface.train", *_argv(cfg)], cwd=repo,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.time() - start < 60
    lines = [x for x in proc.stderr.splitlines() if "jaxface.train: error" in x]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0]
    assert "process 0 of 2" in lines[0] and "within 5 s" in lines[0]


# --- 10. Cluster jobs: a requeued job, a full disk ------------------------------------


def test_resume_takes_auto_besides_true_and_false(repo):
    for value, expected in (("auto", "auto"), ("AUTO", "auto"), ("true", True), ("no", False)):
        assert _cfg(repo, "/x", resume=value).resume == expected
    with pytest.raises(ConfigError, match="'resume' expects true, false or auto, got 'sometimes'"):
        _cfg(repo, "/x", resume="sometimes")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigusr1_stops_like_sigterm_and_resume_auto_serves_every_start(repo, tmp_path, capsys):
    """One command for the first start and every requeue (docs/faults.md's sbatch script):
    resume=auto starts fresh in an empty folder; SLURM's SIGUSR1 before the time limit
    saves the step and exits 138; the same command then resumes from it."""
    out = tmp_path / "run"
    cfg = _cfg(repo, out, checkpoint_every=0, resume="auto")
    proc = _start(repo, cfg, "--config.max_steps=400")
    _wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGUSR1)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, err[-3000:]
    assert f"resume=auto: starting fresh, no checkpoint in {out / 'checkpoints'}" in said
    assert "stopped by SIGUSR1 after step" in err and "Traceback" not in err
    stopped = int(err.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert (out / "checkpoints" / str(stopped)).is_dir()
    capsys.readouterr()
    assert main(_argv(cfg.replace(max_steps=stopped))) == 0  # nothing left: no step compiled
    said = capsys.readouterr().out
    assert f"resume=auto: resuming, {out / 'checkpoints'} holds step {stopped}" in said
    assert f"resumed from {out / 'checkpoints' / str(stopped)} (step {stopped}," in said


def _private_tmpfs_works() -> bool:
    """`unshare -rm`: a mount namespace of our own (no root needed) where a small tmpfs can
    be mounted; it vanishes with the processes, so no test leaves a mount behind."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_earlier_ones(
    repo, tmp_path, capsys
):
    """A real 4 MB filesystem holds two checkpoints of the tiny run (1.5 MB each): the
    third save fails in orbax's background write, which surfaces at the next save. The
    same command again (a requeue) finds the disk too full at start-up."""
    if not _private_tmpfs_works():
        pytest.skip("mounting a small tmpfs needs `unshare -rm` (user and mount namespaces)")
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    cfg = _cfg(repo, disk / "run", resume="auto", max_steps=400, keep_checkpoints=3)
    command = shlex.join([sys.executable, "-m", "jaxface.train", *_argv(cfg)])
    q = lambda path: shlex.quote(str(path))  # noqa: E731
    logs = {n: [tmp_path / f"{n}.{kind}" for kind in ("out", "err", "rc")] for n in (1, 2)}
    runs = "".join(f"{command} > {q(o)} 2> {q(e)}; echo $? > {q(r)}\n" for o, e, r in logs.values())
    script = f"mount -t tmpfs -o size=4m tmpfs {q(disk)} || exit 99\n{runs}"
    script += f"cp -a {q(disk / 'run')} {q(after)}\n"
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=repo, check=True, timeout=300)
    out, err, rc = (p.read_text() for p in logs[1])
    assert int(rc) == 1, err[-3000:]
    lines = err.splitlines()  # one line: no traceback, none of orbax's or tensorstore's
    assert len(lines) == 1 and lines[0].startswith(
        f"jaxface.train: error: checkpoint step 6 could not be saved in {disk}/run/checkpoints: "
        "no space left on the device (a checkpoint needs 1.6 MB, "
    ), err[-3000:]
    assert "is free); earlier checkpoints kept: steps 2, 4. A new checkpoint" in lines[0]
    assert sorted(p.name for p in (after / "checkpoints").iterdir()) == ["2", "4"]  # no partial
    out, err, rc = (p.read_text() for p in logs[2])
    assert int(rc) == 2, err[-3000:]
    assert f"resume=auto: resuming, {disk}/run/checkpoints holds step 4" in out
    assert "but one checkpoint of this run needs 1.6 MB (1,561,176 bytes" in err
    # The kept checkpoint is whole: the job continues from it once there is room.
    assert main(_argv(_cfg(repo, after, resume="auto", max_steps=4))) == 0
    assert f"resumed from {after}/checkpoints/4 (step 4," in capsys.readouterr().out
