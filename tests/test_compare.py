"""compare: FLOP counts, the tool end to end at tiny sizes for both frameworks, bad input."""

import json
import os
import subprocess
import sys

import pytest

from compare import cli
from compare.flops import (
    PUBLISHED_GMACS,
    backbone_macs,
    mobilefacenet_counts,
    train_flops_per_image,
)
from jaxface.config import derive, load_config

TINY = ["--config", "configs/demo.py", "--steps", "2", "--warmup", "1",
        "--config.num_classes=20", "--config.embedding_size=16"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_flop_count_matches_the_published_gmacs(name):
    # insightface's mobilefacenet figure comes from ptflops, which also counts BatchNorm and
    # PReLU element operations: compare like with like (docs/backbones.md).
    macs = sum(mobilefacenet_counts(name)) if name.startswith("mbf") else backbone_macs(name)
    assert macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)


def test_training_flops_of_r50_as_reference_md():
    # docs/sources.md: 37.9 GFLOP backbone + 1.9 GFLOP head per image = 39.8.
    assert train_flops_per_image("r50", 617_970) / 1e9 == pytest.approx(39.8, rel=0.01)
    assert train_flops_per_image("r50", 617_970, sample_rate=0.1) < 38.2e9


@pytest.mark.slow
@pytest.mark.torch
def test_end_to_end_with_a_failing_and_a_skipped_row(repo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    real = cli.worker_command

    def failing_tuned(variant, spec, out, devices):
        if variant.flavour == "tuned":
            return [sys.executable, "-c", "import sys; sys.exit('deliberate failure')"]
        return real(variant, spec, out, devices)

    monkeypatch.setattr(cli, "worker_command", failing_tuned)
    out = tmp_path / "cmp"
    args = [*TINY, "--frameworks", "jax,torch", "--precision", "fp32,tf32", "--batch", "2"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[6/6]" in printed and "about 0 s to go" in printed
    rows = {
        (r["flavour"], r["precision"]): r
        for r in json.loads((out / "results.json").read_text())["rows"]
    }
    for flavour in ("jax", "stock"):
        row = rows[(flavour, "fp32")]
        assert row["samples_per_s"] > 0 and row["ms_per_step"] > 0, row
        assert row["flops_per_image"] > 0 and row["mfu"] is None  # no peak rate for a CPU
    assert "deliberate failure" in rows[("tuned", "fp32")]["error"]
    for flavour in ("jax", "stock"):
        assert "TF32 needs an NVIDIA GPU" in rows[(flavour, "tf32")]["skipped"]
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["versions"]["jax"] and meta["versions"]["torch"] and meta["devices"] == 1
    table = (out / "table.md").read_text()
    assert "| Dataset | Classes | Backbone | Batch-size | FP16 | TF32 |" in table
    assert "| synthetic, on the device | 20 | iresnet_tiny | 2 | no | no |" in table
    assert "failed: exit status 1: deliberate failure" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.torch
def test_budget_skips_the_rows_it_cannot_start(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(repo)
    out = tmp_path / "cmp"
    args = [*TINY, "--frameworks", "torch", "--precision", "fp32", "--batch", "2"]
    assert cli.main([*args, "--budget", "0.001", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert "samples_per_s" in rows[0]  # the first row always starts
    assert rows[1]["skipped"] == "the --budget of 0.001 s was spent"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frameworks", "jax,tf"], "unknown framework 'tf' (choose from jax, torch)"),
        (["--precision", "fp8"], "unknown precision 'fp8' (choose from fp32, tf32, fp16, bf16)"),
        (["--batch", "128,x"], "--batch '128,x' must be comma-separated integers"),
        (["--config.network=r51"], "'network'"),
    ],
)  # fmt: skip
def test_bad_arguments(repo, monkeypatch, capsys, args, message):
    monkeypatch.chdir(repo)
    assert cli.main(["--config", "configs/demo.py", *args]) == 2
    assert message in capsys.readouterr().err


def test_framework_not_installed_says_how_to_install(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    assert cli.main(["--config", "configs/demo.py", "--frameworks", "jax,torch"]) == 2
    assert "torch is not installed; install it with: pip install -e '.[torch]'" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.multiprocess
def test_two_devices_fed_by_the_real_loader(repo, tmp_path, monkeypatch):
    """A 2-device jax mesh and 2 torchrun (gloo) processes, both reading the RecordIO the
    jax row packs (the demo config's pack_synthetic)."""
    monkeypatch.chdir(repo)
    out, rec = tmp_path / "cmp", tmp_path / "data" / "train"
    args = [*TINY, "--frameworks", "jax,torch", "--precision", "fp32", "--batch", "2"]
    args += ["--data", "rec", f"--config.rec={rec}", "--config.num_image=400"]
    assert cli.main([*args, "--devices", "2", "--config.num_workers=1", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["dataset"] == str(rec) and rec.with_suffix(".rec").exists()
    assert [r["flavour"] for r in data["rows"]] == ["jax", "stock", "tuned"]
    for row in data["rows"]:
        assert row["device"] == "2 x cpu" and row["samples_per_s"] > 0, row
    assert "| 4 | no | no |" in (out / "table.md").read_text()  # global batch 2 x 2


@pytest.mark.slow
@pytest.mark.torch
def test_profile_writes_hlo_trace_and_numbers(repo, tmp_path, monkeypatch, capsys):
    from compare import profile

    monkeypatch.chdir(repo)
    # Batch 8: XLA's cost analysis charges each kernel of the flat-view SGD's split the whole
    # update (jaxface.fused_sgd), per step whatever the batch; at batch 2 that is as much as
    # the tiny model's own FLOPs.
    args = ["--config", "configs/demo.py", "--precision", "fp32", "--batch", "8"]
    args += ["--steps", "1", "--trace-steps", "1", "--out", str(tmp_path)]
    args += ["--config.num_classes=20"]
    assert profile.main(args) == 0
    summary = json.loads((tmp_path / "profile.json").read_text())
    # XLA counts BatchNorm, PReLU and the optimizer too: a little above the model's count.
    assert 1.0 <= summary["xla_cost"]["flops"] / summary["model_flops_per_step"] < 1.5
    assert summary["hlo_ops"]["convolution"] > 0 and summary["ms_per_step"] > 0
    assert " convolution(" in (tmp_path / "step.hlo.txt").read_text()
    assert any((tmp_path / "trace").rglob("*.xplane.pb"))
    assert "GFLOP per step: model" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.torch
def test_a_repeated_batch_is_learnt_with_denormals_flushed(repo, tmp_path, monkeypatch):
    """One batch repeated is learnt by heart and fills torch with denormal numbers, on which
    its CPU kernels slow down unless they are flushed as XLA does. The flushing is checked
    by its effect (a denormal reads back as 0 once torchref is set up); how much it matters
    for speed is a benchmark (python -m compare.denormals), not a timed test."""
    import torch

    from torchref import engine

    monkeypatch.chdir(repo)
    out = tmp_path / "pool1"
    args = [*TINY, "--frameworks", "torch", "--precision", "fp32", "--batch", "8",
            "--steps", "60", "--warmup", "60", "--pool", "1", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    (row,) = [r for r in json.loads((out / "results.json").read_text())["rows"]
              if r["flavour"] == "stock"]  # fmt: skip
    assert row["loss"] < 1.0  # the repeated batch really was learnt
    assert "denormal numbers flushed to zero" in (out / "table.md").read_text()
    torch.set_flush_denormal(False)
    assert torch.tensor([1e-40]).item() != 0.0  # this CPU keeps denormals by default
    cfg = load_config(repo / "configs/demo.py", {"num_classes": "20", "embedding_size": "16"})
    engine.build(cfg, derive(cfg, 1), engine.Options(), torch.device("cpu"))
    assert torch.tensor([1e-40]).item() == 0.0


def test_gpu_benchmark_script_hands_the_profile_its_overrides_and_reports_failures(repo, tmp_path):
    """compare/gpu_benchmark.sh with a stand-in python that logs its arguments: a tiny dry
    run's config overrides and --steps reach the profile (it compiled the full r50 for
    450 s before), compare's own options do not, and a part that fails makes it exit 1."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit ${{FAIL:-0}}\n')
    fake.chmod(0o755)
    cmd = ["bash", "compare/gpu_benchmark.sh", "--config.network=iresnet_tiny"]
    cmd += ["--config.num_classes", "100", "--steps", "1", "--budget", "5"]
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "TOTAL": "400"}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    profile = [line for line in log.read_text().splitlines() if "compare.profile" in line]
    assert len(profile) == 1
    args = profile[0].split()
    assert "--config.network=iresnet_tiny" in args and "--budget" not in args
    assert args[args.index("--config.num_classes") + 1] == "100"
    assert args[args.index("--steps") + 1] == "1"
    failed = subprocess.run(cmd, cwd=repo, env={**env, "FAIL": "3"}, capture_output=True, text=True)
    assert failed.returncode == 1 and "compare.profile exited with 3" in failed.stdout
