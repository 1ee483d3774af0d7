"""MobileFaceNet and ViT: arcface_torch's architecture, keys and parameter counts, parity with
torchref (forward, BatchNorm statistics, one training step), conversion, ONNX, remat, and
the bad inputs. Relative errors are norm-wise, in float32 at highest precision."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jax_train_step, rel_err
from conftest import random_images as images

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch]

from flax.traverse_util import flatten_dict  # noqa: E402

from compare.flops import PUBLISHED_GMACS, backbone_macs, mobilefacenet_counts  # noqa: E402
from jaxface import convert, convert_cli, families  # noqa: E402
from jaxface.config import ConfigError, derive, load_config  # noqa: E402
from jaxface.convert import flax_to_torch, torch_to_flax  # noqa: E402
from jaxface.fileio import ConvertError  # noqa: E402
from jaxface.head_shards import pad_centres  # noqa: E402
from jaxface.heads import margin_from_config  # noqa: E402
from jaxface.mesh import make_mesh  # noqa: E402
from jaxface.models import get_model as jax_model  # noqa: E402
from jaxface.models import normalize_images as jax_normalize  # noqa: E402
from jaxface.models.mobilefacenet import MobileFaceNet  # noqa: E402
from jaxface.models.names import MOBILEFACENETS, VITS  # noqa: E402
from jaxface.models.vit import drop_path_rates  # noqa: E402
from jaxface.optim import make_optimizer  # noqa: E402
from jaxface.precision import Policy  # noqa: E402
from jaxface.step import make_train_step  # noqa: E402
from jaxface.weights import load_backbone  # noqa: E402
from torchref import engine  # noqa: E402
from torchref.iresnet import normalize_images as torch_normalize  # noqa: E402
from torchref.models import get_model as torch_model  # noqa: E402
from torchref.parity import reference_step  # noqa: E402

NEW = [*MOBILEFACENETS, *VITS]
# arcface_torch's numbers (embedding 512), counted on torchref's modules, which are key for
# key and shape for shape arcface_torch's: trainable parameters, BatchNorm running statistics
# (mean + var) and state-dict entries.
PUBLISHED = {
    "mbf": (2_059_520, 23_808, 333),
    "mbf_large": (6_314_880, 52_736, 606),
    "vit_t": (19_137_792, 1_536, 150),
    "vit_t_dp005_mask0": (19_137_792, 1_536, 150),
    "vit_s": (76_023_296, 2_048, 150),
    "vit_s_dp005_mask_0": (76_023_296, 2_048, 150),
    "vit_b": (113_833_472, 2_048, 282),
    "vit_b_dp005_mask_005": (113_833_472, 2_048, 282),
    "vit_l_dp005_mask_005": (255_684_352, 2_560, 282),
    "vit_h": (756_393_984, 3_072, 546),
}
NO_NOISE = {"mask_ratio": 0.0, "drop_path_rate": 0.0}


@pytest.fixture(autouse=True)
def _highest_precision():
    torch.set_float32_matmul_precision("highest")
    with jax.default_matmul_precision("highest"):
        yield


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, batch: int = 2):
    images = jax.ShapeDtypeStruct((batch, 112, 112, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return variables, jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)


def randomised(network: str, seed: int = 0, embedding_size: int = 512, **overrides):
    """A torchref backbone whose BN statistics, biases, norms and slopes are off their init
    values, so that a wrong mapping of any of them shows."""
    torch.manual_seed(seed)
    model = torch_model(network, num_features=embedding_size, **overrides)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_mean") or key.endswith("bias"):
                value.normal_(0, 0.1)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif value.ndim == 1 and key.endswith("weight"):  # BN/LN scales, PReLU slopes
                value.uniform_(0.0, 0.5) if "layers.2." in key else value.uniform_(0.5, 1.5)
    return model


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("name", NEW)
def test_parameter_counts_and_keys(name):
    params, stats, entries = PUBLISHED[name]
    with torch.device("meta"):
        ref = torch_model(name)
    sd = ref.state_dict()
    assert sum(p.numel() for p in ref.parameters()) == params
    assert len(sd) == entries
    table = families.table(name, 512)
    assert [(e.key, e.shape) for e in table] == [(k, tuple(v.shape)) for k, v in sd.items()]
    variables, out = _abstract(jax_model(name))
    assert out.shape == (2, 512) and out.dtype == jnp.float32
    assert _count(variables["params"]) == params
    assert _count(variables["batch_stats"]) == stats
    leaves = {f"params/{'/'.join(k)}" for k in flatten_dict(variables["params"])}
    leaves |= {f"batch_stats/{'/'.join(k)}" for k in flatten_dict(variables["batch_stats"])}
    assert leaves == families.flax_leaves(table)


def test_vit_details():
    assert [len(VITS), VITS["vit_t"].embed_dim, VITS["vit_h"].depth] == [8, 256, 48]
    with torch.device("meta"):
        ref = torch_model("vit_t")
    assert ref.patch_embed.num_patches == 144 and ref.pos_embed.shape == (1, 144, 256)
    assert ref.blocks[0].attn.qkv.bias is None and ref.blocks[0].norm1.eps == 1e-5
    assert isinstance(ref.blocks[0].mlp.act, torch.nn.ReLU6)
    assert ref.feature[1].eps == ref.feature[3].eps == 2e-5
    rates = torch.linspace(0, 0.1, 12)
    assert drop_path_rates(0.1, 12) == [r.item() for r in rates]  # float32, to the bit
    with torch.device("meta"):
        assert [torch_model(n).using_checkpoint for n in ("vit_s", "vit_b")] == [False, True]


def test_gmacs_match_published():
    for name in ("vit_t", "vit_s", "vit_b", "vit_l_dp005_mask_005"):
        assert round(backbone_macs(name) / 1e9, 1) == PUBLISHED_GMACS[name], name
    assert backbone_macs("vit_t_dp005_mask0") == backbone_macs("vit_t")
    macs, elementwise = mobilefacenet_counts("mbf")
    assert macs == backbone_macs("mbf") and round(macs / 1e9, 2) == 0.44
    assert round((macs + elementwise) / 1e9, 2) == PUBLISHED_GMACS["mbf"]  # ptflops' count


# --------------------------------------------------------------------------- parity


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_same_embeddings_eval_and_train(network):
    overrides = NO_NOISE if network.startswith("vit") else {}
    model = randomised(network, embedding_size=64, **overrides)
    params, stats = torch_to_flax(model.state_dict(), network)
    flax_model = jax_model(network, embedding_size=64, **overrides)
    batch = images(4)
    x_jax, x_torch = jax_normalize(jnp.asarray(batch)), torch_normalize(torch.from_numpy(batch))

    model.eval()
    with torch.no_grad():
        expected = model(x_torch).numpy()
    got = jax.jit(lambda p, s, x: flax_model.apply({"params": p, "batch_stats": s}, x))(
        params, stats, x_jax
    )
    assert rel_err(got, expected) <= 1e-5

    model.train()
    with torch.no_grad():
        expected = model(x_torch).numpy()
    got, updates = jax.jit(
        lambda p, s, x: flax_model.apply(
            {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
        )
    )(params, stats, x_jax)
    assert rel_err(got, expected) <= 1e-5
    _, torch_stats = torch_to_flax(model.state_dict(), network)
    new, ref = flatten_dict(jax.device_get(updates["batch_stats"])), flatten_dict(torch_stats)
    assert new.keys() == ref.keys()
    assert max(rel_err(new[k], ref[k]) for k in ref) <= 1e-5
    assert max(rel_err(flatten_dict(stats)[k], ref[k]) for k in ref) > 1e-3  # they moved


STEP_CONFIGS = {
    # arcface_torch's mbf recipe (SGD, CosFace) and its ViT one (AdamW, wd 0.1), with smaller
    # learning rates: float32 rounding of the step (see below) shows in the weights in
    # proportion to the step's size, and AdamW's first step is lr * sign(g) elementwise.
    "mbf": {"margin_list": "1.0,0.0,0.4", "lr": "0.01", "weight_decay": "1e-4"},
    "vit_t": {"margin_list": "1.0,0.0,0.4", "optimizer": "adamw", "lr": "2e-4",
              "weight_decay": "0.1"},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_one_training_step_matches(repo, network, monkeypatch):
    """Masking and drop-path off (random draws cannot agree across frameworks)."""
    num_classes = 13
    cfg = load_config(
        repo / "configs/demo.py",
        {"network": network, "embedding_size": "32", "num_classes": str(num_classes),
         "batch_size": "4", "num_image": "400", "warmup_epoch": "0", "scale": "64.0",
         **STEP_CONFIGS[network]},
    )  # fmt: skip
    derived = derive(cfg, 1)
    overrides = NO_NOISE if network.startswith("vit") else {}
    monkeypatch.setattr(engine, "get_model", partial(torch_model, **overrides))
    model = randomised(network, seed=1, embedding_size=32, **overrides)
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    centres = (0.01 * rng.standard_normal((num_classes, 32))).astype(np.float32)
    batch = images(4, seed=4)
    labels = rng.integers(0, num_classes, 4).astype(np.int32)

    ref = reference_step(cfg, derived, state_dict, centres, batch, labels, 1)
    params, stats = torch_to_flax(state_dict, network)
    flax_model = jax_model(network, embedding_size=32, **overrides)
    new, loss = jax_train_step(
        cfg, derived, flax_model, params, stats, pad_centres(centres, num_classes, 1), batch,
        labels, make_mesh(1),
    )  # fmt: skip

    assert abs(loss - ref["loss"]) / abs(ref["loss"]) <= 1e-5
    got = flax_to_torch(new.params["backbone"], new.batch_stats, network)
    for key, expected in ref["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            continue
        if key == "mask_token":
            # Unused without masking: PyTorch's AdamW skips a parameter without a gradient,
            # optax decays it (lr * wd per step). A documented difference.
            assert np.array_equal(expected, state_dict[key])
            decay = 1 - cfg.lr * cfg.weight_decay
            np.testing.assert_allclose(got[key], state_dict[key] * decay, rtol=1e-6)
            continue
        if key == "norm.bias" and cfg.optimizer == "adamw":
            # Its true gradient is zero (a per-channel shift of every token is removed by
            # feature.1, BatchNorm over the batch); AdamW's g / (|g| + eps) turns rounding
            # noise of ~1e-9 into steps of up to lr on either side.
            assert np.abs(got[key] - expected).max() <= 2 * cfg.lr
            continue
        # AdamW's first step is lr * g / |g|: where a gradient is rounding noise it steps
        # +-lr either way (feature.2.weight: 2.1e-4 relative on one CPU). A wrong mapping
        # is off by O(1).
        assert rel_err(got[key], expected) <= (5e-4 if cfg.optimizer == "adamw" else 1e-4), key
        moved = expected - state_dict[key]
        if np.linalg.norm(moved) > 1e-4 * np.linalg.norm(expected):
            # float32's floor: torchref's own gradients at batch 4 differ from a float64 run
            # by up to 1.7e-3 relative (BatchNorm over 4 samples amplifies rounding), and the
            # two frameworks' float32 sums by up to 1.6e-2 on another CPU (mbf's biases and
            # first depthwise weight, vit_t's patch embedding); a wrong mapping is off by O(1).
            assert rel_err(got[key] - state_dict[key], moved) <= 3e-2, key
    assert rel_err(np.asarray(new.params["head"]["centres"]), ref["centres"]) <= 1e-4


# --------------------------------------------------------------------------- randomness


def _small_vit(**kw):
    return jax_model("vit_t", embedding_size=16, depth=2, embed_dim=64, **kw)


def _small(network: str, **kw):
    """The family's architecture at a fraction of the cost (the tests' CPU is small)."""
    if network.startswith("vit"):
        return _small_vit(**{**NO_NOISE, **kw})
    return MobileFaceNet(blocks=(2, 1, 1, 1), scale=1, embedding_size=16, **kw)


def test_masking_and_drop_path_follow_the_key():
    model = _small_vit(mask_ratio=0.1, drop_path_rate=0.5)
    x = jax_normalize(jnp.asarray(images(4)))
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def train(key):
        out, _ = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return out

    a, b, c = train(jax.random.key(1)), train(jax.random.key(1)), train(jax.random.key(2))
    np.testing.assert_array_equal(a, b)  # reproducible
    assert rel_err(a, c) > 1e-3  # another key, other masks and dropped paths
    evaluated = jax.jit(lambda x: model.apply(variables, x))(x)  # no rng needed in eval
    off = _small_vit(**NO_NOISE)
    plain, _ = off.apply(variables, x, train=True, mutable=["batch_stats"])
    assert rel_err(a, plain) > 1e-3 and evaluated.shape == (4, 16)


@pytest.mark.slow
def test_train_step_draws_a_new_mask_each_step(repo):
    cfg = load_config(
        repo / "configs/demo.py",
        {"network": "vit_t", "embedding_size": "16", "num_classes": "8", "batch_size": "4",
         "num_image": "400", "warmup_epoch": "0"},
    )  # fmt: skip
    derived = derive(cfg, 1)
    model = _small_vit(mask_ratio=0.3, drop_path_rate=0.0)
    mesh = make_mesh(1)
    tx, schedule = make_optimizer(cfg, derived)
    from jaxface.step import device_state, make_init_fn

    init = make_init_fn(model, tx, 8, 8)
    state = jax.jit(lambda s: device_state(init(s), 1))(0)
    step = jax.jit(make_train_step(model, tx, schedule, margin_from_config(cfg), 8, mesh))
    batch, labels = jnp.asarray(images(4)), jnp.arange(4, dtype=jnp.int32)
    loss = [float(step(state, batch, labels)[1]["loss"]) for _ in range(2)]
    later = float(step(state.replace(step=state.step + 1), batch, labels)[1]["loss"])
    assert loss[0] == loss[1]  # same state, same key, same masks
    assert abs(later - loss[0]) > 1e-6  # the step's key moved on: other masks


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_bf16_keeps_params_and_output_float32(network):
    model = _small(network, policy=Policy("bf16", jnp.bfloat16))
    x = jax_normalize(jnp.asarray(images(2)), jnp.bfloat16)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    y, _ = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
        )
    )(variables, x)
    assert y.dtype == jnp.float32 and y.shape == (2, 16) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.slow
def test_torchref_checkpointed_vit_trains():
    model = torch_model("vit_b", num_features=16, depth=2, embed_dim=64)
    assert model.using_checkpoint
    model.train()
    model(torch.randn(2, 3, 112, 112)).square().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.mask_token.grad is not None


# --------------------------------------------------------------------------- remat


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_remat_changes_memory_not_numbers(network):
    plain, remat = _small(network), _small(network, remat=True)
    x = jax_normalize(jnp.asarray(images(2)))
    variables = jax.jit(plain.init)(jax.random.key(0), x)

    def loss(model, params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            mutable=["batch_stats"],
        )  # fmt: skip
        return jnp.sum(out * jnp.arange(16.0))

    grads = [jax.jit(jax.grad(partial(loss, m)))(variables["params"]) for m in (plain, remat)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_refused_without_blocks(repo):
    with pytest.raises(ValueError, match="remat=True: network 'r50' .* no rematerialisable"):
        jax_model("r50", remat=True)
    with pytest.raises(ConfigError, match=r"config key 'remat'=True: network 'r18'"):
        load_config(repo / "configs/r18.py", {"remat": "true"})
    assert load_config(repo / "configs/wf42m_vit_b.py", {"remat": "true"}).remat


# --------------------------------------------------------------------------- interchange


@pytest.mark.parametrize("network", ["mbf", "mbf_large", "vit_t"])
def test_torch_jax_torch_is_bit_identical(network, tmp_path):
    model = randomised(network, seed=2, embedding_size=128)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                value.fill_(7)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert convert_cli.main(["torch2jax", str(tmp_path / "model.pt"), str(tmp_path / "w.npz")]) == 0
    assert convert_cli.main(["jax2torch", str(tmp_path / "w.npz"), str(tmp_path / "back.pt")]) == 0
    a = torch.load(tmp_path / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key
    params, stats, info = load_backbone(tmp_path / "w.npz")
    assert info["network"] == network and convert.embedding_size_of_params(params) == 128


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mbf", "vit_t"])
def test_onnx_export_matches_torch(network, tmp_path):
    pytest.importorskip("onnxruntime")
    from torchref.export_onnx import check, export

    model = randomised(network, embedding_size=64).eval()
    export(model, tmp_path / "m.onnx")
    with torch.no_grad():
        scale = float(model(torch.zeros(1, 3, 112, 112)).abs().max())
    assert check(model, tmp_path / "m.onnx", batch=2) <= 1e-5 * max(scale, 1.0)


@pytest.mark.slow
def test_infer_eval_and_init_from_accept_new_names(tmp_path, capsys):
    from jaxface import eval as jax_eval
    from jaxface import infer as jax_infer
    from jaxface.data.synthetic import SyntheticFaces, write_synthetic_bin
    from torchref import infer as torch_infer

    model = randomised("mbf", embedding_size=32)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "x.npy", images(2))
    outs = []
    for i, module in enumerate((jax_infer, torch_infer)):
        out = tmp_path / f"e{i}.npy"
        args = ["--weights", str(tmp_path / "model.pt"), "--npy", str(tmp_path / "x.npy")]
        assert module.main([*args, "--out", str(out)]) == 0
        outs.append(np.load(out))
    assert outs[0].shape == (2, 32) and rel_err(outs[0], outs[1]) <= 1e-5
    pt = str(tmp_path / "model.pt")
    tiny_bin = tmp_path / "tiny_val.bin"  # 10 pairs, one per fold: mbf is slow at LLVM -O0
    write_synthetic_bin(tiny_bin, SyntheticFaces(12, seed=1), 400, 10)
    assert jax_eval.main(["--weights", pt, "--bin", str(tiny_bin), "--batch", "1"]) == 0
    assert "tiny_val" in capsys.readouterr().out
    params, stats, _ = load_backbone(pt, "mbf", 32)  # what --config.init_from uses
    variables, _ = _abstract(jax_model("mbf", embedding_size=32))
    shapes = jax.tree.map(lambda a: a.shape, {"params": params, "batch_stats": stats})
    assert shapes == jax.tree.map(lambda a: a.shape, dict(variables))
    with pytest.raises(ConvertError, match="embedding size 32, expected 64"):
        load_backbone(pt, "mbf", 64)


# --------------------------------------------------------------------------- bad input


def test_unknown_network_lists_the_known_ones(repo):
    for make in (jax_model, torch_model):
        with pytest.raises(ValueError, match=r"unknown backbone 'vit_x'; choose one of .*mbf"):
            make("vit_x")
    with pytest.raises(ConfigError, match=r"config key 'network'='vit_x' .*vit_t_dp005_mask0"):
        load_config(repo / "configs/mbf.py", {"network": "vit_x"})


def test_model_pt_of_another_family_is_named(tmp_path):
    torch.save(torch_model("mbf").state_dict(), tmp_path / "model.pt")
    with pytest.raises(ConvertError) as info:
        load_backbone(tmp_path / "model.pt", "vit_t")
    message = str(info.value)
    assert "model.pt" in message and "mobilefacenet family (mbf)" in message
    assert "\n" not in message
    torch.save(torch_model("vit_t").state_dict(), tmp_path / "v.pt")
    with pytest.raises(ConvertError, match=r"vit family \(vit_t\), not a r50 \(iresnet family\)"):
        load_backbone(tmp_path / "v.pt", "r50")


def test_dropout_refused_where_there_is_none():
    with pytest.raises(ValueError, match="dropout=0.2: mbf has no dropout layer"):
        jax_model("mbf", dropout=0.2)


def test_new_configs_load(repo):
    names = {"wf42m_vit_t": "vit_t_dp005_mask0", "wf42m_vit_s": "vit_s_dp005_mask_0",
             "wf42m_vit_b": "vit_b_dp005_mask_005", "wf42m_vit_l": "vit_l_dp005_mask_005",
             "mbf": "mbf", "mbf_large": "mbf_large"}  # fmt: skip
    for file, network in names.items():
        cfg = load_config(repo / f"configs/{file}.py")
        assert cfg.network == network
    vit_t = load_config(repo / "configs/wf42m_vit_t.py")
    assert (vit_t.optimizer, vit_t.lr, vit_t.weight_decay, vit_t.batch_size) == (
        "adamw", 1e-3, 0.1, 512)  # fmt: skip
    assert (vit_t.sample_rate, vit_t.margin_list, vit_t.num_epoch, vit_t.warmup_epoch) == (
        0.3, (1.0, 0.0, 0.4), 40, 4)  # fmt: skip
