"""The README shows what `make train` prints today: its losses are recomputed here.

When this fails after a change to the trainer or the demo, run `make demo-output`."""

import os
import re
import subprocess
import sys

import pytest


def _readme_losses(repo) -> dict[int, float]:
    block = repo.joinpath("README.md").read_text().split("<!-- demo-output: begin -->")[1]
    block = block.split("<!-- demo-output: end -->")[0]
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+\s+loss ([0-9.]+)", block)}


@pytest.mark.slow
def test_readme_demo_losses_are_what_the_demo_computes(repo, tmp_path):
    shown = _readme_losses(repo)
    assert 10 in shown and 20 in shown, "README's demo block lost its step lines"
    # `make train`'s own compiler settings (not the tests' fast-compile ones), 20 steps:
    # max_steps leaves the schedule alone, so these are the full run's first steps.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxface.train", "--config", "configs/demo.py",
           "--config.max_steps=20", "--config.progress=plain", "--config.val_targets=[]",
           f"--config.output={tmp_path / 'demo'}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    now = {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+\s+loss ([0-9.]+)", done.stdout)}
    for step in (10, 20):
        assert now[step] == pytest.approx(shown[step], rel=2e-3), (step, now, shown)
