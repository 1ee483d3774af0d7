"""The memory planner: XLA's per-device memory analysis of the compiled step, no allocation."""

import os
import subprocess
import sys

import pytest

from jaxface.config import load_config
from jaxface.plan import largest_class_count, main, step_memory

pytestmark = [pytest.mark.slow]  # each test compiles the whole step, some several times


def _cfg(repo, **overrides):
    values = dict(num_classes=8000, batch_size=2, embedding_size=64, sample_rate=1.0)
    values.update(overrides)
    return load_config(repo / "configs/demo.py", {k: str(v) for k, v in values.items()})


def test_memory_grows_with_the_class_shard(repo):
    cfg = _cfg(repo)
    small = step_memory(cfg, 4)
    large = step_memory(cfg.replace(num_classes=16000), 4)
    per_device_centres = (16000 - 8000) // 4 * 64 * 4  # float32 rows added to each device
    # Centres and their momentum are both arguments (donated, so aliased by the outputs).
    assert large["arguments"] - small["arguments"] >= 2 * per_device_centres
    assert large["peak"] > small["peak"]


def test_largest_class_count_fits_the_budget(repo):
    cfg = _cfg(repo, sample_rate=0.5)
    budget = step_memory(cfg.replace(num_classes=40000), 2)["peak"]
    best, fit = largest_class_count(cfg, 2, budget)
    assert fit["peak"] <= budget
    assert 30000 < best <= 40000 * 1.05 and best % 2 == 0


def test_cli(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["--config", "configs/demo.py", "--devices", "2", "--config.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "2 devices: per device" in out and "peak" in out
    assert main(["--config", "configs/demo.py", "--devices", "2", "--config.sample_rate=2"]) == 2
    assert "'sample_rate'=2.0 must be in (0, 1]" in capsys.readouterr().err


def test_sampled_head_costs_two_float32_copies_per_class(repo):
    """SampledSGD: centres + momentum, updated in place; no dense gradient, no normalised
    copy. Per class and device: two rows of E float32, plus the sampled 10 % (gathered
    rows, their gradient, materialised before the update so that it needs no copy of the
    centres, and logits), about half a row here (0.50 measured)."""
    cfg = _cfg(repo, embedding_size=256, sample_rate=0.1)
    small = step_memory(cfg, 2)["peak"]
    large = step_memory(cfg.replace(num_classes=16000), 2)["peak"]
    rows = (large - small) / ((16000 - 8000) / 2) / (256 * 4)
    assert 2.0 <= rows < 2.6, rows


def test_the_command_gets_its_virtual_devices(repo):
    """As a user runs it (a fresh process, no XLA_FLAGS): `--devices 8` makes 8 CPU devices
    before jax loads, rather than finding the 1 it would have started with."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-m", "jaxface.plan", "--config", "configs/demo.py", "--devices", "8"]
    done = subprocess.run(
        [*cmd, "--config.batch_size=2"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8 devices: per device" in done.stdout
