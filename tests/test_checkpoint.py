"""Checkpoints, exact resume (also on another device count), export, eval and plot CLIs."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxface import eval as eval_cli
from jaxface import plot as plot_cli
from jaxface.checkpoint import Checkpointer, CheckpointError
from jaxface.config import DENSE_ROW_ALIGN, ConfigError, load_config
from jaxface.train import train
from jaxface.weights import load_torch_state_dict, load_weights

pytestmark = [pytest.mark.slow]


def _cfg(repo, out, **overrides):
    base = dict(
        num_classes=12, num_image=4000, batch_size=4, embedding_size=32, frequent=1,
        val_targets="[]", progress="plain", output=str(out), warmup_epoch=0, lr=0.1,
        checkpoint_every=3, tensorboard=False, rec="synthetic", pack_synthetic=False,
        num_workers=0,
    )  # fmt: skip
    base.update(overrides)
    return load_config(repo / "configs/demo.py", {k: str(v) for k, v in base.items()})


def _losses(summary):
    return {r["step"]: r["loss"] for r in summary["history"]}


def test_resume_continues_exactly_and_on_fewer_devices(repo, tmp_path):
    # 4,000 classes fill every device's block (500 of 512 rows on 8 devices, 1,000 of 1,024
    # on 4), so re-sharding moves real rows between devices.
    common = dict(sync_bn=True, global_batch_size=32, num_classes=4000, num_image=8000)
    full = _losses(train(_cfg(repo, tmp_path / "full", max_steps=6, **common)))

    part = tmp_path / "part"
    first = _losses(train(_cfg(repo, part, max_steps=3, **common)))
    assert first == {s: full[s] for s in (1, 2, 3)}
    assert sorted(os.listdir(part / "checkpoints")) == ["3"]
    shutil.copytree(part, tmp_path / "part4")

    resumed = train(_cfg(repo, part, max_steps=6, resume=True, **common))
    assert _losses(resumed) == {s: full[s] for s in (4, 5, 6)}  # bit for bit
    assert int(resumed["state"].step) == 6

    # Saved on 8 devices (8 x 512 rows), continued on 4 (4 x 1,024): the head is re-sharded.
    # Statistics over the whole batch make the two runs the same computation.
    on_four = train(
        _cfg(repo, tmp_path / "part4", max_steps=6, resume=True, num_devices=4, **common)
    )
    assert on_four["state"].params["head"]["centres"].shape == (4 * 2 * DENSE_ROW_ALIGN, 32)
    for step, loss in _losses(on_four).items():
        assert loss == pytest.approx(full[step], rel=1e-4)


def test_interrupted_save_is_ignored_and_mismatches_are_refused(repo, tmp_path):
    out = tmp_path / "run"
    train(_cfg(repo, out, max_steps=3))
    # What a process killed mid-save leaves behind: orbax's temporary folder, half written.
    partial = out / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(out / "checkpoints" / "3", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    resumed = train(_cfg(repo, out, max_steps=4, resume=True))
    assert [r["step"] for r in resumed["history"]] == [4]

    for key, value, message in [
        ("num_classes", 13, "written for num_classes=12, but the config says num_classes=13"),
        ("embedding_size", 16, "written for embedding_size=32"),
        ("network", "r18", "written for network='iresnet_tiny', but the config says network='r18'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            train(_cfg(repo, out, max_steps=8, resume=True, **{key: value}))

    with pytest.raises(CheckpointError, match="holds no checkpoint; start without"):
        train(_cfg(repo, tmp_path / "empty", max_steps=2, resume=True))


def test_sigkill_during_training_leaves_a_usable_checkpoint(repo, tmp_path):
    out = tmp_path / "killed"
    args = [f"--config.{k}={v}" for k, v in _cfg(repo, out, checkpoint_every=1).to_dict().items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxface.train", "--config", "configs/demo.py", *args,
         "--config.max_steps=400", "--config.num_devices=1"],
        cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (out / "checkpoints" / "2").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before checkpointing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # checkpoints are written every step: likely mid-save
    proc.wait()
    latest = Checkpointer(out / "checkpoints", keep=3).latest_step()
    assert latest >= 2
    resumed = train(_cfg(repo, out, checkpoint_every=1, max_steps=latest + 2, resume=True,
                         num_devices=1))  # fmt: skip
    assert [r["step"] for r in resumed["history"]] == [latest + 1, latest + 2]


def test_export_eval_plot_tensorboard_and_wandb(repo, tmp_path, capsys, small_val_bin):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    summary = train(_cfg(repo, out, max_steps=4, val_targets=str(small_val_bin), verbose=4,
                         tensorboard=True, wandb=True, wandb_mode="offline"))  # fmt: skip
    # W&B, offline: one run under OUTPUT/wandb named by the id jaxface keeps for resumes; its
    # records hold the same keys as TensorBoard's.
    run_id = (out / "wandb-run-id").read_text()
    (record_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    logged = record_file.read_bytes()
    assert b"train/loss" in logged and b"val/small_val/accuracy" in logged
    assert f"W&B run run ({run_id}): offline in {out / 'wandb'}" in capsys.readouterr().out
    state = jax.device_get(summary["state"])
    params, stats, meta = load_weights(out / "backbone.npz")
    assert meta == {"network": "iresnet_tiny", "num_batches_tracked": 4}
    torch_sd = load_torch_state_dict(out / "model.pt")  # arcface_torch's layout
    assert torch_sd["fc.bias"].shape == (32,) and "layer1.0.downsample.1.running_var" in torch_sd
    for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(state.params["backbone"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(stats)) == len(jax.tree.leaves(state.batch_stats))

    val = summary["val_records"][-1]
    for weights in (out, out / "model.pt"):
        assert eval_cli.main(["--weights", str(weights), "--bin", str(small_val_bin)]) == 0
        printed = capsys.readouterr().out
        assert f"Accuracy-Flip {val['accuracy']:.5f}+-{val['std']:.5f}" in printed
    assert eval_cli.main(["--weights", str(out / "checkpoints" / "4"),
                          "--bin", str(small_val_bin)]) == 0  # fmt: skip
    assert f"Accuracy-Flip {val['accuracy']:.5f}" in capsys.readouterr().out

    assert eval_cli.main(["--weights", str(tmp_path), "--bin", "x.bin"]) == 2
    assert "expected a jaxface run folder" in capsys.readouterr().err
    assert eval_cli.main(["--weights", str(out), "--bin", str(tmp_path / "no.bin")]) == 1
    assert "no.bin: cannot be read" in capsys.readouterr().err

    assert plot_cli.main([str(out)]) == 0
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").iterdir())


def test_init_from_a_torch_backbone(repo, tmp_path):
    torch = pytest.importorskip("torch")
    from jaxface.convert import torch_to_flax
    from torchref import get_model

    net = get_model("iresnet_tiny", num_features=32)  # arcface_torch's name for it
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    cfg = _cfg(repo, tmp_path / "ft", max_steps=1, init_from=str(path), lr=1e-9,
               weight_decay=0, checkpoint_every=0)  # fmt: skip
    state = jax.device_get(train(cfg)["state"])
    expected, _ = torch_to_flax({k: v.numpy() for k, v in net.state_dict().items()},
                                "iresnet_tiny", 32)  # fmt: skip
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params["backbone"]),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)  # one step at lr 1e-9
    bad = _cfg(repo, tmp_path / "bad", max_steps=1, init_from=str(path), network="r18")
    from jaxface.config import ConfigError

    with pytest.raises(ConfigError, match="'init_from'="):
        train(bad)
