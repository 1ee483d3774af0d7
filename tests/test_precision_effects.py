"""Settings that could be silently ignored, checked by their effect rather than by numbers
that an ignored setting would also give: bf16/fp16 convolutions in the lowered step,
remat's checkpoint in the step's jaxpr, torchref's autocast dtypes and GradScaler."""

import re

import jax
import pytest

from jaxface.config import load_config
from jaxface.mesh import make_mesh
from jaxface.setup import build

SMALL = dict(num_classes=12, num_image=4000, batch_size=4, embedding_size=32, rec="synthetic",
             pack_synthetic=False, val_targets="[]", num_devices=1)  # fmt: skip


def _run(repo, config="configs/demo.py", **overrides):
    values = {**SMALL, **overrides}
    cfg = load_config(repo / config, {k: str(v) for k, v in values.items()})
    return build(cfg, make_mesh(1))


def _conv_types(text: str) -> list[str]:
    """Element types of the convolutions' results in a StableHLO module."""
    return re.findall(r"stablehlo\.convolution.*-> tensor<[0-9x]+x(\w+)>", text)


@pytest.mark.parametrize("precision, dtype", [("fp32", "f32"), ("bf16", "bf16"), ("fp16", "f16")])
def test_precision_sets_the_convolutions_dtype(repo, precision, dtype):
    text = _run(repo, precision=precision).lower().as_text()
    types = _conv_types(text)
    # Forward and backward convolutions (38 in iresnet_tiny's step) all in the trunk's dtype.
    assert len(types) >= 30 and set(types) == {dtype}, sorted(set(types))


def _jaxpr_text(run) -> str:
    images, labels = run.abstract_batch()
    return str(jax.make_jaxpr(run.train_step)(run.step_abstract_state, images, labels))


@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_remat_puts_checkpoints_in_the_step(repo, network):
    overrides = dict(network=network, embedding_size=32, precision="fp32")
    plain = _jaxpr_text(_run(repo, **overrides))
    remat = _jaxpr_text(_run(repo, **overrides, remat=True))
    # jax.checkpoint appears as `remat2` equations; the backward pass recomputes each
    # block's forward, so the step holds more convolutions (mbf) or matmuls (vit_t).
    assert "remat2[" not in plain and remat.count("remat2[") >= 4
    op = "conv_general_dilated[" if network == "mbf" else "dot_general["
    assert remat.count(op) > plain.count(op)


torch = pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torchref_autocast_and_grad_scaler_take_effect(repo, precision):
    from jaxface.config import derive
    from torchref import engine

    cfg = load_config(repo / "configs/demo.py", {k: str(v) for k, v in SMALL.items()})
    ref = engine.build(
        cfg, derive(cfg, 1), engine.Options(precision=precision), torch.device("cpu")
    )
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is kept

        return hook

    convs = [m for m in ref.model.modules() if isinstance(m, torch.nn.Conv2d)]
    convs[0].register_forward_hook(record("conv"))
    ref.head.register_forward_hook(record("loss"))
    images = torch.randint(0, 255, (4, 112, 112, 3), dtype=torch.uint8)
    loss = engine.train_step(ref, images, torch.tensor([0, 1, 2, 3]))
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert seen["conv"] == half  # the trunk runs under autocast
    assert seen["loss"] == torch.float32 and loss.dtype == torch.float32  # the head does not
    assert ref.head.weight.dtype == torch.float32
    assert ref.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert ref.scaler.get_scale() in (65536.0, 32768.0)  # GradScaler's start (or halved)
