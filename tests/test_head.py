"""The class-sharded head on 8 devices against a dense single-device float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import head_loss, rel_err

from jaxface.heads import Margin, init_class_centres
from jaxface.heads.losses import ElasticFace
from jaxface.mesh import batch_sharding, class_sharding, make_mesh


def assert_close(actual, expected, rtol=1e-4):
    """Elementwise rtol, with an absolute floor scaled to the array's largest entry: gradients
    that nearly cancel cannot carry more relative precision than float32 gives the big ones."""
    expected = np.asarray(expected)
    atol = 1e-5 * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def dense_reference(emb, labels, centres, margin: Margin, num_classes):
    """Plain margin softmax cross-entropy over all classes on one device."""
    e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    w = centres[:num_classes]
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    cos = jnp.clip(jnp.dot(e, w.T, precision="highest"), -1, 1)
    target = jax.nn.one_hot(labels, num_classes, dtype=bool)
    logits = margin.logits(cos, target)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


MARGINS = {
    "arcface": Margin(1.0, 0.5, 0.0),
    "cosface": Margin(1.0, 0.0, 0.4),
    "sphereface": Margin(1.35, 0.0, 0.0),
    "combined": Margin(1.2, 0.3, 0.2),
    "filtered": Margin(1.0, 0.5, 0.0, filter_threshold=0.05),
    "plain": Margin(1.0, 0.0, 0.0),
}


def _problem(num_classes, devices, batch=32, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int32)
    padded = -(-num_classes // devices) * devices
    centres = np.array(init_class_centres(jax.random.key(seed), num_classes, padded, dim))
    # Pull a few centres towards their samples so that targets are not all at cos ~ 0.
    centres[labels[:8]] += 0.02 * emb[:8]
    return emb, labels, centres


def _sharded_value_and_grads(emb, labels, centres, margin, num_classes, mesh):
    fn = jax.jit(
        jax.value_and_grad(
            lambda e, w: head_loss(
                e, labels_s, w, margin=margin, num_classes=num_classes, mesh=mesh
            ),
            argnums=(0, 1),
        )
    )
    labels_s = jax.device_put(labels, batch_sharding(mesh))
    emb_s = jax.device_put(emb, batch_sharding(mesh))
    centres_s = jax.device_put(centres, class_sharding(mesh))
    loss, (g_emb, g_centres) = fn(emb_s, centres_s)
    assert g_emb.sharding.is_equivalent_to(batch_sharding(mesh), 2)
    assert g_centres.sharding.is_equivalent_to(class_sharding(mesh), 2)
    return float(loss), np.asarray(g_emb), np.asarray(g_centres)


@pytest.mark.parametrize("grad_mode", ["straight_through", "exact"])
@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("num_classes", [21, 5])  # 21: uneven split; 5: some shards all padding
def test_sharded_equals_dense(name, grad_mode, num_classes):
    margin = Margin(**{**MARGINS[name].__dict__, "grad": grad_mode})
    mesh = make_mesh(8)
    emb, labels, centres = _problem(num_classes, 8)
    loss, g_emb, g_centres = _sharded_value_and_grads(
        emb, labels, centres, margin, num_classes, mesh
    )
    ref_loss, (ref_emb, ref_centres) = jax.value_and_grad(
        lambda e, w: dense_reference(e, labels, w, margin, num_classes), argnums=(0, 1)
    )(emb, centres)
    np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-6)
    assert_close(g_emb, ref_emb)
    assert_close(g_centres, ref_centres)
    assert np.all(g_centres[num_classes:] == 0)  # padding rows: no gradient, no NaN


def test_one_device_equals_eight():
    emb, labels, centres = _problem(21, 8)
    one = _sharded_value_and_grads(emb, labels, centres, MARGINS["arcface"], 21, make_mesh(1))
    eight = _sharded_value_and_grads(emb, labels, centres, MARGINS["arcface"], 21, make_mesh(8))
    np.testing.assert_allclose(one[0], eight[0], rtol=1e-6)
    assert_close(one[1], eight[1])
    assert_close(one[2], eight[2])


def _grads(emb, labels, centres, mesh, **kwargs):
    fn = jax.value_and_grad(
        lambda e, w: head_loss(
            e, labels, w, margin=MARGINS["arcface"], num_classes=21, mesh=mesh, **kwargs
        ),
        argnums=(0, 1),
    )
    loss, grads = jax.jit(fn)(emb, centres)
    return float(loss), [np.asarray(g) for g in grads]


def test_the_cosines_gradient_in_bfloat16_rounds_only_it():
    """grad_dtype=bfloat16 (bf16's Policy.cosine_grad_dtype) rounds the loss's gradient with
    respect to the cosine product, and nothing else: the loss is float32's exactly, and the
    embeddings' and centres' gradients (its two products) differ from float32's by about
    bfloat16's rounding, alike on 1 and 8 devices."""
    emb, labels, centres = _problem(21, 8)
    loss32, grads32 = _grads(emb, labels, centres, make_mesh(8))
    loss16, grads16 = _grads(emb, labels, centres, make_mesh(8), grad_dtype=jnp.bfloat16)
    one = _grads(emb, labels, centres, make_mesh(1), grad_dtype=jnp.bfloat16)
    assert loss16 == loss32
    for g16, g32, g1 in zip(grads16, grads32, one[1], strict=True):
        assert 1e-5 < rel_err(g16, g32) < 2**-7  # bfloat16 keeps 8 significant bits
        assert_close(g1, g16)


def test_margin_values():
    cos = jnp.array([0.8, 0.3])
    theta = np.arccos([0.8, 0.3])
    np.testing.assert_allclose(Margin(1, 0.5, 0).target_logit(cos), np.cos(theta + 0.5), 1e-6)
    np.testing.assert_allclose(Margin(1, 0, 0.4).target_logit(cos), [0.4, -0.1], 1e-6)
    np.testing.assert_allclose(Margin(1.35, 0, 0).target_logit(cos), np.cos(1.35 * theta), 1e-6)
    np.testing.assert_allclose(
        Margin(1.2, 0.3, 0.2).target_logit(cos), np.cos(1.2 * theta + 0.3) - 0.2, 1e-6
    )


def test_gradient_modes():
    c = 0.6
    st = jax.grad(lambda x: Margin(1, 0.5, 0).target_logit(x))(c)
    exact = jax.grad(lambda x: Margin(1, 0.5, 0, grad="exact").target_logit(x))(c)
    theta = np.arccos(c)
    assert float(st) == 1.0  # the margin acts as a constant offset (arcface_torch)
    np.testing.assert_allclose(float(exact), np.sin(theta + 0.5) / np.sin(theta), rtol=1e-5)
    # Near cos = 1 the exact derivative grows large but stays finite.
    assert np.isfinite(float(jax.grad(Margin(1, 0.5, 0, grad="exact").target_logit)(1.0)))


def _arcface_target(c):
    return np.cos(np.arccos(np.float64(np.float32(c))) + 0.5)  # at the float32 input


@pytest.mark.parametrize("c", [1.0, 1 - 3e-7, -1.0, -1 + 3e-7])
def test_exact_mode_keeps_the_value_at_the_true_cosine(c):
    """Only the derivative is taken inside 1e-6 of +-1: the loss value is the formula's
    (clipping the cosine itself moved it by up to 0.044 for m = 0.5)."""
    margin = Margin(1, 0.5, 0, grad="exact")
    value, grad = jax.value_and_grad(margin.target_logit)(jnp.float32(c))
    np.testing.assert_allclose(float(value), _arcface_target(c), atol=2e-6)
    inside = np.clip(c, -1 + 1e-6, 1 - 1e-6)
    theta = np.arccos(inside)
    np.testing.assert_allclose(float(grad), np.sin(theta + 0.5) / np.sin(theta), rtol=2e-2)
    # The per-sample losses' exact paths go through the same function.
    elastic = ElasticFace(kind="arc", m=0.5, scale=1.0, grad="exact")

    def elastic_target(x):
        logits = elastic.logits(
            x.reshape(1, 1), jnp.ones((1, 1), bool), {"margin": jnp.full(1, 0.5)}
        )
        return logits[0, 0]

    value, grad = jax.value_and_grad(elastic_target)(jnp.float32(c))
    np.testing.assert_allclose(float(value), _arcface_target(c), atol=2e-6)
    assert np.isfinite(float(grad))


def test_filtering_zeroes_only_negatives():
    cos = jnp.array([[0.9, 0.5, 0.1]])
    is_target = jnp.array([[True, False, False]])
    logits = Margin(1, 0, 0, scale=1.0, filter_threshold=0.3).logits(cos, is_target)
    np.testing.assert_allclose(logits, [[0.9, 0.0, 0.1]], rtol=1e-6)


def test_loss_is_exact_where_arcface_torch_clamps():
    """p_y far below 1e-30: arcface_torch reports 69.08 (its clamp); the gradient still flows."""
    mesh = make_mesh(8)
    dim, num_classes = 4, 16
    centres = np.zeros((num_classes, dim), np.float32)
    centres[:, 0] = 1.0
    centres[3] = [-1.0, 0, 0, 0]  # the target points away from the embedding
    emb = np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (8, 1))
    labels = np.full(8, 3, np.int32)
    loss, g_emb, g_centres = _sharded_value_and_grads(
        emb, labels, centres, Margin(1, 0, 0, scale=64.0), num_classes, mesh
    )
    assert loss > 69.08 * 1.5
    np.testing.assert_allclose(loss, 128.0 + np.log(15), rtol=1e-5)
    assert np.isfinite(g_emb).all() and np.isfinite(g_centres).all()
