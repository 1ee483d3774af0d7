import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxface.config import derive, load_config
from jaxface.fused_sgd import FusedSGD, _groups, concat_order
from jaxface.optim import (
    LARGE_LEAF,
    all_finite,
    flat_views,
    global_norm,
    lr_schedule,
    make_optimizer,
)


def test_schedule_warmup_then_poly_decay():
    s = lr_schedule(0.1, warmup_steps=10, total_steps=110, power=1.0)
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10, 60, 110, 200)],
                               [0.0, 0.05, 0.1, 0.05, 0.0, 0.0], atol=1e-7)  # fmt: skip
    s2 = lr_schedule(0.1, warmup_steps=0, total_steps=100, power=2.0)
    np.testing.assert_allclose(float(s2(0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(s2(50)), 0.1 * 0.25, rtol=1e-6)


def _cfg(repo, **overrides):
    cfg = load_config(repo / "configs/demo.py", {k: str(v) for k, v in overrides.items()})
    return cfg, derive(cfg, 1)


def _params():
    rng = np.random.default_rng(0)
    return {
        "backbone": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
        "head": {"centres": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)},
    }  # fmt: skip


def _grads(step):
    rng = np.random.default_rng(100 + step)
    # Backbone gradients with norm well above 5, so clipping acts; the head's are larger still
    # and must not be clipped.
    return {
        "backbone": {"w": jnp.asarray(10 * rng.normal(size=(3, 4)), jnp.float32),
                     "b": jnp.asarray(10 * rng.normal(size=(4,)), jnp.float32)},
        "head": {"centres": jnp.asarray(30 * rng.normal(size=(5, 4)), jnp.float32)},
    }  # fmt: skip


def _flat(tree):
    return {
        f"{k}/{j}": np.asarray(v, np.float64) for k, sub in tree.items() for j, v in sub.items()
    }


def test_sgd_matches_torch_semantics(repo):
    """clip_grad_norm_(backbone, 5); torch.optim.SGD(momentum, weight_decay) by hand."""
    cfg, derived = _cfg(repo, warmup_epoch=0, lr=0.1, weight_decay=5e-4, momentum=0.9)
    tx, schedule = make_optimizer(cfg, derived)
    params = _params()
    state = tx.init(params)
    ref = _flat(params)
    buf = {}
    for step in range(3):
        grads = _grads(step)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

        g = _flat(grads)
        backbone_norm = np.sqrt(sum(np.sum(v**2) for k, v in g.items() if k.startswith("backbone")))
        clip = min(1.0, 5.0 / backbone_norm)
        lr = float(schedule(step))
        for k in ref:
            d = g[k] * (clip if k.startswith("backbone") else 1.0) + 5e-4 * ref[k]
            buf[k] = d if step == 0 else 0.9 * buf[k] + d
            ref[k] = ref[k] - lr * buf[k]
        for k, v in _flat(params).items():
            # float32 against a float64 reference: absolute floor at the array's scale.
            np.testing.assert_allclose(v, ref[k], rtol=2e-6, atol=1e-6 * np.abs(ref[k]).max())


def test_adamw_matches_torch_semantics(repo):
    cfg, derived = _cfg(repo, optimizer="adamw", warmup_epoch=0, lr=1e-3, weight_decay=0.1)
    tx, schedule = make_optimizer(cfg, derived)
    params = _params()
    state = tx.init(params)
    ref = _flat(params)
    m, v = {}, {}
    for step in range(2):
        grads = _grads(step)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

        g = _flat(grads)
        norm = np.sqrt(sum(np.sum(x**2) for k, x in g.items() if k.startswith("backbone")))
        lr = float(schedule(step))
        for k in ref:
            gk = g[k] * (min(1.0, 5.0 / norm) if k.startswith("backbone") else 1.0)
            m[k] = 0.9 * m.get(k, 0) + 0.1 * gk
            v[k] = 0.999 * v.get(k, 0) + 0.001 * gk**2
            m_hat, v_hat = m[k] / (1 - 0.9 ** (step + 1)), v[k] / (1 - 0.999 ** (step + 1))
            ref[k] = ref[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.1 * ref[k])
        for k, x in _flat(params).items():
            np.testing.assert_allclose(x, ref[k], rtol=1e-5, atol=1e-6 * np.abs(ref[k]).max())


@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_clipping_can_be_disabled(repo, clip):
    cfg, derived = _cfg(repo, grad_clip_norm=clip, weight_decay=0, momentum=0, warmup_epoch=0)
    tx, schedule = make_optimizer(cfg, derived)
    params = _params()
    updates, _ = tx.update(_grads(0), tx.init(params), params)
    norm = float(optax.tree.norm(updates["backbone"])) / float(schedule(0))
    assert (norm == pytest.approx(5.0, rel=1e-5)) == (clip == 5.0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", ["small", "large"])
def test_flat_norm_and_finite_check(bad, where):
    """One reduction per flat view (small leaves concatenated, large ones alone) gives
    optax's global norm, and a finite check that sees an inf or NaN in any leaf."""
    rng = np.random.default_rng(0)
    tree = {
        "bn": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
        "conv": jnp.asarray(rng.normal(size=(3, 3, 16, 8)), jnp.float32),
        "big": jnp.asarray(rng.normal(size=(LARGE_LEAF + 1,)), jnp.float32),
    }
    np.testing.assert_allclose(global_norm(tree), optax.tree.norm(tree), rtol=1e-6)
    assert bool(all_finite(tree))
    assert bool(all_finite({"huge": jnp.full((4,), 3e38, jnp.float32)}))  # x^2 overflows
    key = "bn" if where == "small" else "big"
    broken = {**tree, key: tree[key].at[5].set(bad)}
    assert not bool(all_finite(broken))
    assert not bool(jax.jit(all_finite)(broken))


def _chain_step(tx, params, grads, state, finite):
    """The optax chain as step.py applied it before FusedSGD: update, apply, keep if finite."""
    updates, new_state = tx.chain.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    if finite is not None and not finite:
        return params, state
    return new_params, new_state


@pytest.mark.parametrize("clip", [0.0, 5.0, 1e6])
@pytest.mark.parametrize("large", [LARGE_LEAF, 12])
@pytest.mark.parametrize("finite", [None, True, False])
def test_fused_sgd_equals_the_optax_chain(repo, clip, large, finite):
    """FusedSGD.apply (one pass over flat views) gives the chain's parameters and state:
    clipped or not, with leaves concatenated or alone (large=12: the 3x4 kernel and the
    5x4 centres are updated alone), and a non-finite step leaves everything as it was."""
    cfg, derived = _cfg(repo, warmup_epoch=0, lr=0.1, weight_decay=5e-4, momentum=0.9,
                        grad_clip_norm=clip)  # fmt: skip
    tx, _ = make_optimizer(cfg, derived)
    assert isinstance(tx, FusedSGD)
    tx = dataclasses.replace(tx, large=large)
    params = ref_params = _params()
    state = ref_state = tx.init(params)
    apply = jax.jit(tx.apply)
    for step in range(3):
        grads = _grads(step)
        gate = None if finite is None else jnp.bool_(finite)
        params, state = apply(params, grads, state, gate)
        ref_params, ref_state = _chain_step(tx, ref_params, grads, ref_state, finite)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for got, want in zip(jax.tree.leaves((params, state)), jax.tree.leaves((ref_params, ref_state)),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert int(optax.tree_utils.tree_get(state, "count")) == (0 if finite is False else 3)


def test_fused_sgd_backbone_when_sampling(repo):
    """With class sampling SampledSGD updates the centres; its backbone part is a FusedSGD
    that clips every leaf it is given."""
    cfg, derived = _cfg(repo, sample_rate=0.5, warmup_epoch=0, momentum=0.9, grad_clip_norm=5.0)
    tx, _ = make_optimizer(cfg, derived)
    assert isinstance(tx.backbone, FusedSGD) and tx.backbone.clip_only is None
    params = _params()["backbone"]
    state = tx.backbone.init(params)
    grads = _grads(0)["backbone"]
    got, _ = tx.backbone.apply(params, grads, state)
    updates, _ = tx.backbone.chain.update(grads, state, params)
    want = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_small_leaves_are_concatenated_smallest_first():
    """The flat view and FusedSGD's groups put the small leaves in one order, smallest first
    and ties in tree order (jaxface.fused_sgd.concat_order: XLA:GPU writes a concatenation's
    first 128 operands twice)."""
    tree = {"a": jnp.arange(6.0), "b": jnp.arange(2.0) + 10, "c": jnp.arange(2.0) + 20}
    assert concat_order([6, 2, 2]) == [1, 2, 0]
    np.testing.assert_array_equal(flat_views(tree)[0], [10, 11, 20, 21, 0, 1, 2, 3, 4, 5])
    leaves = jax.tree.leaves(tree)
    assert _groups(leaves, [True, True, False], large=100) == [([1, 0], True), ([2], False)]
