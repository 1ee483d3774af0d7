"""torchref's trainer on the same config files: a short run, its outputs, its refusals."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxface import convert  # noqa: E402
from torchref import train  # noqa: E402
from torchref.optim import lr_at  # noqa: E402


def test_short_run_writes_arcface_torch_files(repo, tmp_path, capsys):
    argv = ["--config", str(repo / "configs/demo.py"), "--config.num_classes=12",
            "--config.batch_size=8", "--config.max_steps=4", "--config.frequent=2",
            "--config.num_image=480", f"--config.output={tmp_path}"]  # fmt: skip
    assert train.main(argv) == 0
    out = tmp_path / "torchref"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    # The LR after step 4 is the schedule's value for step 4 (warm-up 0.1 epoch = 6 steps).
    assert records[-1]["lr"] == pytest.approx(lr_at(4, 0.1, 6, 60, 1.0))
    params, stats, network = convert.load_backbone(out / "model.pt")
    assert network == "iresnet_tiny" and params["fc"]["bias"].shape == (128,)
    shards = convert.load_head_shards([out])
    assert convert.shards_to_centres(shards, 12, 8).shape == (16, 128)


def test_bad_config_and_unsupported_margin(repo, tmp_path, capsys):
    base = ["--config", str(repo / "configs/demo.py"), f"--config.output={tmp_path}"]
    assert train.main([*base, "--config.lr=-1"]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert train.main([*base, "--config.rec=/data/x"]) == 2
    assert "synthetic" in capsys.readouterr().err
    assert train.main([*base, "--config.margin_list=1.35,0,0", "--config.max_steps=1"]) == 2
    assert "arcface_torch implements only ArcFace" in capsys.readouterr().err
