from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxface.convert import fc_from_torch, fc_to_torch
from jaxface.mesh import DATA_AXIS, make_mesh
from jaxface.models import BACKBONES, get_model
from jaxface.models.layers import BatchNorm, PReLU, strided_pointwise_conv
from jaxface.precision import Policy

# arcface_torch's trainable parameter counts (features.weight is frozen, so not counted)
# and BatchNorm running statistics (mean + var, num_batches_tracked not counted).
PUBLISHED = {
    "r18": (24_025_088, None),
    "r34": (34_138_816, None),
    "r50": (43_590_336, 38_144),
    "r100": (65_155_648, None),
    "r200": (118_833_408, None),
}
ROUNDED_M = {"r18": 24.03, "r34": 34.14, "r50": 43.59, "r100": 65.16, "r200": 118.83}


def _abstract_variables(name, **kw):
    model = get_model(name, **kw)
    images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
    return variables, out


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "iresnet_tiny"])
def test_parameter_counts_and_shapes(name):
    variables, out = _abstract_variables(name)
    assert out.shape == (2, 512) and out.dtype == jnp.float32
    n_params = _count(variables["params"])
    if name in PUBLISHED:
        assert n_params == PUBLISHED[name][0]
        assert round(n_params / 1e6, 2) == ROUNDED_M[name]
        if PUBLISHED[name][1]:
            assert _count(variables["batch_stats"]) == PUBLISHED[name][1]
    else:  # r180 has no published count: it must sit between r100 and r200
        assert PUBLISHED["r100"][0] < n_params < PUBLISHED["r200"][0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    fc = variables["params"]["fc"]["kernel"]
    assert fc.shape == (512 * 7 * 7, 512)
    assert "scale" not in variables["params"]["features"]  # frozen at 1, as arcface_torch


def test_module_names_follow_torch_keys():
    variables, _ = _abstract_variables("r50")
    params = variables["params"]
    assert set(params) >= {"conv1", "bn1", "prelu", "bn2", "fc", "features"}
    block = params["layer3_13"]
    assert set(block) == {"bn1", "conv1", "bn2", "prelu", "conv2", "bn3"}
    assert set(params["layer1_0"]) == {
        "bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample_0", "downsample_1"
    }  # fmt: skip
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert params["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
    assert params["layer2_0"]["prelu"]["slope"].shape == (128,)
    assert "layer3_14" not in params


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'r51'"):
        get_model("r51")


def test_wrong_image_size():
    model = get_model("iresnet_tiny")
    with pytest.raises(ValueError, match=r"expects images of shape \(N, 112, 112, 3\)"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3))))


def test_bf16_policy_keeps_params_and_output_float32():
    model = get_model("iresnet_tiny", policy=Policy("bf16", jnp.bfloat16), embedding_size=32)
    x = jnp.zeros((2, 112, 112, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    y, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert y.dtype == jnp.float32 and y.shape == (2, 32)


def test_init_matches_arcface_torch():
    model = get_model("iresnet_tiny", embedding_size=16)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 112, 112, 3)))["params"]
    conv = np.asarray(params["layer4_0"]["conv2"]["kernel"])
    assert abs(conv.std() - 0.1) < 0.005  # N(0, 0.1) whatever the fan-in
    assert np.all(np.asarray(params["prelu"]["slope"]) == 0.25)
    fc = np.asarray(params["fc"]["kernel"])
    bound = 1 / np.sqrt(fc.shape[0])
    assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.95 * bound
    assert np.abs(np.asarray(params["fc"]["bias"])).max() <= bound


def test_batchnorm_has_pytorch_statistics():
    x = np.random.default_rng(0).normal(2.0, 3.0, (6, 4, 4, 5)).astype(np.float32)
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=True)
    y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    flat = x.reshape(-1, 5)
    mean, var = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    y_eval = bn.apply({**variables, **updated}, x, train=False)
    np.testing.assert_allclose(
        y_eval, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_gradient_is_autodiff_of_the_two_pass_form(groups, dtype):
    """The closed-form backward (and one-pass statistics, shifted by a sample of the batch)
    against autodiff of the textbook two-pass BatchNorm."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(1.5, 2.0, (4, 3, 3, 6)), dtype)
    scale = jnp.asarray(rng.normal(1.0, 0.2, 6), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.2, 6), jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), dtype)
    bn = BatchNorm(num_groups=groups, dtype=dtype)
    variables = bn.init(jax.random.key(0), x, train=True)
    variables["batch_stats"]["mean"] = jnp.full((6,), 1.4)  # a shift near the batch mean

    def ours(x, scale, bias):
        v = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
        y, _ = bn.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    def reference(x, scale, bias):
        g = x.astype(jnp.float32).reshape(groups, -1, 6)
        mean = g.mean(axis=1, keepdims=True)
        var = jnp.square(g - mean).mean(axis=1, keepdims=True)
        y = ((g - mean) / jnp.sqrt(var + 1e-5) * scale + bias).reshape(x.shape).astype(dtype)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(x, scale, bias)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
    np.testing.assert_allclose(ours(x, scale, bias), reference(x, scale, bias), rtol=tol)


@pytest.mark.parametrize("groups", [1, 2, DATA_AXIS])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_then_prelu_in_one_function_has_autodiff_gradients(groups, dtype):
    """PReLU given its BatchNorm (batch_norm_prelu_train, which recomputes the normalised
    values in its backward pass) against the two layers one after the other, with slopes
    positive, zero and negative; DATA_AXIS: BatchNorm over 2 devices' batches (sync BN).
    bfloat16: the slope's gradient is summed in float32 here, in bfloat16 by autodiff."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0.3, 2.0, (4, 3, 3, 6)), dtype)
    dy = jnp.asarray(rng.normal(size=x.shape), dtype)
    params = {
        "bn": {"scale": jnp.asarray(rng.normal(1.0, 0.2, 6), jnp.float32),
               "bias": jnp.asarray(rng.normal(0.0, 0.5, 6), jnp.float32)},
        "prelu": {"slope": jnp.array([0.25, -0.3, 0.0, 0.6, 1.5, -2.0], jnp.float32)},
    }  # fmt: skip

    class Fused(nn.Module):
        @nn.compact
        def __call__(self, x):
            bn = BatchNorm(num_groups=groups, dtype=dtype, name="bn")
            return PReLU(dtype=dtype, name="prelu")(x, bn, True)

    class Apart(nn.Module):
        @nn.compact
        def __call__(self, x):
            return PReLU(dtype=dtype, name="prelu")(
                BatchNorm(num_groups=groups, dtype=dtype, name="bn")(x, True)
            )

    def loss(module, params, x, dy):
        stats = {"bn": {"mean": jnp.full((6,), 0.3), "var": jnp.ones(6)}}
        y, _ = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    def value_and_grads(module):
        """(loss, the parameters' gradients, x's gradient)."""
        fn = jax.value_and_grad(partial(loss, module), argnums=(0, 1))
        if groups != DATA_AXIS:
            value, (g_params, g_x) = jax.jit(fn)(params, x, dy)
            return value, g_params, g_x

        def on_device(p, xs, dys):
            # Varying copies of the weights, as the train step makes: each device's share.
            value, (g_params, g_x) = fn(jax.lax.pcast(p, DATA_AXIS, to="varying"), xs, dys)
            return jax.lax.psum(value, DATA_AXIS), jax.lax.psum(g_params, DATA_AXIS), g_x

        spec = P(DATA_AXIS)
        return jax.jit(
            jax.shard_map(
                on_device,
                mesh=make_mesh(2),
                in_specs=(P(), spec, spec),
                out_specs=(P(), P(), spec),
            )
        )(params, x, dy)

    got_value, got_params, got_x = value_and_grads(Fused())
    want_value, want_params, want_x = value_and_grads(Apart())
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got_value, want_value, rtol=tol)
    assert got_x.dtype == want_x.dtype == dtype
    np.testing.assert_allclose(np.float32(got_x), np.float32(want_x), rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))


@pytest.mark.parametrize("size", [8, 7])
def test_strided_pointwise_conv_has_autodiff_gradients(size):
    """The 1x1 strided convolution whose input gradient is formed on the strided grid: value
    and gradients those of lax.conv_general_dilated (an odd size leaves the last row and
    column out of the product)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, size, size, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 1, 4, 6)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 4, 4, 6)), jnp.float32)
    kw = dict(padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")

    def loss(conv, x, w):
        return jnp.sum(conv(x, w, (2, 2), **kw) * dy)

    got = jax.value_and_grad(partial(loss, strided_pointwise_conv), argnums=(0, 1))(x, w)
    want = jax.value_and_grad(partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.all(got[1][0][:, 1::2] == 0) and np.all(got[1][0][:, :, 1::2] == 0)


def test_batchnorm_groups_are_independent_batches():
    x = np.random.default_rng(1).normal(size=(8, 3, 3, 4)).astype(np.float32)
    grouped = BatchNorm(num_groups=4)
    variables = grouped.init(jax.random.key(0), x, train=True)
    y, upd = grouped.apply(variables, x, train=True, mutable=["batch_stats"])
    single = BatchNorm()
    parts = [single.apply(variables, x[2 * g : 2 * g + 2], train=True, mutable=["batch_stats"])
             for g in range(4)]  # fmt: skip
    np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), atol=1e-5)
    mean_of_stats = np.mean([p[1]["batch_stats"]["var"] for p in parts], axis=0)
    np.testing.assert_allclose(upd["batch_stats"]["var"], mean_of_stats, rtol=1e-6)


def test_prelu_per_channel():
    prelu = PReLU()
    x = jnp.array([[-2.0, -2.0, 3.0]])
    variables = {"params": {"slope": jnp.array([0.25, 0.5, 0.1])}}
    np.testing.assert_allclose(prelu.apply(variables, x), [[-0.5, -1.0, 3.0]])


def test_fc_kernel_maps_torch_nchw_flatten():
    rng = np.random.default_rng(0)
    c, h, w, out = 4, 7, 7, 3
    feature_nhwc = rng.normal(size=(2, h, w, c))
    torch_weight = rng.normal(size=(out, c * h * w))
    torch_out = feature_nhwc.transpose(0, 3, 1, 2).reshape(2, -1) @ torch_weight.T
    kernel = fc_from_torch(torch_weight, c, h, w)
    np.testing.assert_allclose(feature_nhwc.reshape(2, -1) @ kernel, torch_out, rtol=1e-12)
    np.testing.assert_array_equal(fc_to_torch(kernel, c, h, w), torch_weight)


@pytest.mark.slow
def test_every_parameter_gets_a_gradient():
    model = get_model("iresnet_tiny", embedding_size=16)
    x = jax.random.normal(jax.random.key(1), (4, 112, 112, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)

    def loss(params):
        y, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * jnp.arange(16.0))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = jax.tree_util.tree_leaves_with_path(grads)
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert not dead
