"""torchref's trainer on the same config files: a short run, its outputs, its refusals."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxface import head_shards, weights  # noqa: E402
from torchref import train  # noqa: E402
from torchref.optim import lr_at  # noqa: E402

pytestmark = [pytest.mark.torch]


@pytest.mark.slow
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
    params, stats, info = weights.load_backbone(out / "model.pt")
    assert info["network"] == "iresnet_tiny" and params["fc"]["bias"].shape == (128,)
    shards = head_shards.load_head_shards([out])
    assert head_shards.shards_to_centres(shards, 12, 8).shape == (16, 128)


def test_bad_config_and_unsupported_margin(repo, tmp_path, capsys):
    base = ["--config", str(repo / "configs/demo.py"), f"--config.output={tmp_path}"]
    assert train.main([*base, "--config.lr=-1"]) == 2
    assert "'lr'" in capsys.readouterr().err
    # torchref reads real data through jaxface's loader: a missing path is named.
    assert train.main([*base, "--config.rec=/data/x", "--config.pack_synthetic=false"]) == 2
    assert "config key 'rec'='/data/x'" in capsys.readouterr().err
    assert train.main([*base, "--config.margin_list=1.35,0,0", "--config.max_steps=1"]) == 2
    assert "arcface_torch implements only ArcFace" in capsys.readouterr().err


def _dense_arcface_loss(emb, centres, labels, s=64.0, m=0.5):
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(centres).T
    cos = cos.clamp(-1, 1)
    target = torch.cos(torch.arccos(cos[torch.arange(len(labels)), labels]) + m)
    logits = cos.clone()
    logits[torch.arange(len(labels)), labels] = target
    p = torch.softmax(s * logits, dim=1)[torch.arange(len(labels)), labels]
    # arcface_torch's clamp: log p_y is cut at log(1e-30) = -69.08, which these random
    # centres reach (the plain cross-entropy would be larger).
    return -p.clamp_min(1e-30).log().mean()


@pytest.mark.parametrize("num_classes, expected_kept", [(20, 10), (6, 4)])
def test_partial_fc_sampling(num_classes, expected_kept):
    """sample_rate 0.5: all positive classes plus random negatives, sorted; if positives
    outnumber int(0.5 * C), only they are kept."""
    from torchref.losses import CombinedMarginLoss
    from torchref.partial_fc import PartialFC

    torch.manual_seed(0)
    head = PartialFC(CombinedMarginLoss(64, 1, 0.5, 0), 8, num_classes, sample_rate=0.5)
    labels = torch.tensor([3, 5, 3, 0, 1, 5])
    emb = torch.randn(6, 8, requires_grad=True)
    loss = head(emb, labels)
    assert loss.item() != pytest.approx(  # the sampled loss is not the full one
        _dense_arcface_loss(emb, head.weight, labels).item(), rel=1e-3
    )
    index = head.weight_index
    assert len(index) == expected_kept
    assert torch.equal(index, index.sort()[0])
    assert set(labels.tolist()) <= set(index.tolist())
    remapped = torch.searchsorted(index, labels)
    want = _dense_arcface_loss(emb, head.weight[index], remapped)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    unused = torch.ones(num_classes, dtype=torch.bool)
    unused[index] = False
    assert not head.weight.grad[unused].any() and head.weight.grad[index].any()


@pytest.mark.parametrize(
    "flags", [["--precision", "fp16", "--channels-last"], ["--precision", "bf16"]]
)
def test_mixed_precision_runs(repo, tmp_path, flags):
    """fp16 (autocast + GradScaler) and bf16 (autocast) train; the head stays float32."""
    argv = ["--config", str(repo / "configs/demo.py"), "--config.num_classes=12",
            "--config.batch_size=8", "--config.max_steps=2", "--config.frequent=1",
            "--config.num_image=480", f"--config.output={tmp_path}", *flags]  # fmt: skip
    assert train.main(argv) == 0
    records = (tmp_path / "torchref" / "metrics.jsonl").read_text().splitlines()
    assert all(np.isfinite(json.loads(r)["loss"]) for r in records)
    sd = torch.load(tmp_path / "torchref" / "model.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
