"""compare.converge: fp32 curves of jaxface and torchref coincide over the first steps of a
short schedule; bad input is refused before anything trains; the GPU script's arguments."""

import json
import os
import subprocess
import sys

import pytest

from compare import converge

pytestmark = [pytest.mark.torch]

TINY = ["--config", "configs/demo.py", "--config.network=iresnet_tiny",
        "--config.embedding_size=32", "--config.num_classes=20", "--config.batch_size=8",
        "--config.rec=synthetic", "--config.pack_synthetic=false", "--config.num_workers=0",
        "--config.lr=0.01", "--config.warmup_epoch=0", "--config.frequent=4"]  # fmt: skip


@pytest.mark.slow
def test_fp32_curves_agree_over_the_first_20_steps(repo, tmp_path, monkeypatch, small_val_bin):
    monkeypatch.chdir(repo)
    # The runs are processes of their own and inherit conftest's -O0, whose float32
    # summation order differs from the default build's: a harder test of agreement (the
    # largest differences over these 20 steps, -O0 / default: loss 4.6e-4 / 2.7e-4, gradient
    # norm 9.2e-4 / 7.1e-4). lr 0.01: the demo's 0.1 amplifies rounding tenfold a step.
    # One thread each: on a shared 2-core machine, PyTorch's spinning OpenMP threads
    # otherwise wait on each other for seconds per step of this tiny model.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    args = [*TINY, "--config.num_image=160", f"--config.val_targets={small_val_bin}",
            "--config.verbose=100", "--precision", "fp32", "--out", str(out)]  # fmt: skip
    assert converge.main(args) == 0
    report = json.loads((out / "results.json").read_text())
    (pair,) = report["pairs"]
    assert len(report["runs"]["jaxface fp32 seed 2048"]["loss"]) == 20
    assert pair["max_rel_diff_early"]["loss"] <= 1e-3, pair["loss_rel_diff"]
    assert pair["max_rel_diff_early"]["grad_norm"] <= 2e-3  # -O0's first layers (above)
    assert pair["first_divergence"]["lr"] is None  # one schedule
    agreement = pair["agreement"]["small_val"]
    assert agreement["cosine_mean"] > 0.999 and agreement["decision_agreement"] >= 0.95
    table = (out / "table.md").read_text()
    assert "| jaxface fp32 seed 2048 |" in table and "| torchref fp32 seed 2048 |" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".work-*"))  # the runs' scratch files are gone


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.margin_list=1.35,0,0"], "arcface_torch implements only ArcFace"),
        (["--config.gradient_acc=2"], "torchref's step has no gradient accumulation"),
        (["--config.network=mbf", "--config.dropout=0.2"], "mbf has no dropout layer"),
        (["--precision", "fp16"], "unknown precision column 'fp16'"),
        (["--config.rec=/nonexistent/train"], "config key 'rec'='/nonexistent/train'"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_anything_trains(
    repo, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(repo)
    monkeypatch.setattr(converge, "run_one", lambda *a: pytest.fail("a run started"))
    out = tmp_path / "cmp"
    assert converge.main([*TINY, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_framework_and_used_output_are_refused(repo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    monkeypatch.setattr(converge, "run_one", lambda *a: pytest.fail("a run started"))
    real = converge.importlib.util.find_spec
    monkeypatch.setattr(
        converge.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    assert converge.main(TINY) == 2
    assert "torch is not installed" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.chdir(repo)
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("a user's file")
    assert converge.main([*TINY, "--out", str(used)]) == 2
    assert "is not an empty folder; its files are kept" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["mine.txt"]


def test_gpu_script_checks_and_lists_its_runs(repo, tmp_path):
    """compare/gpu_converge.sh with --plan on a tiny network: its arguments reach
    compare.converge, which checks them and lists the four runs without training."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    cmd = ["bash", "compare/gpu_converge.sh", "--plan", "--config.network=iresnet_tiny"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "iresnet_tiny, 10,000 classes, global batch 128, 2000 steps, 4 runs" in done.stdout
    for run in ("jaxface bf16 seed 2048", "torchref fp16 seed 2048", "torchref fp16 seed 2049"):
        assert run in done.stdout
    assert not (tmp_path / "out").exists()
    bad = subprocess.run([*cmd, "--config.gradient_acc=2"], cwd=repo, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "exited with 2" in bad.stdout
