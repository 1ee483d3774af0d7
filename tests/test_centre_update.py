"""The dense head's centres updated from the cosines' gradient (jaxface.heads.centre_update):
the Pallas kernel (interpreted on the CPU) against the XLA formula, and the train step that
uses it against the step that differentiates the centres themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from jaxface.config import derive, load_config
from jaxface.fused_sgd import FusedSGD
from jaxface.heads import centre_update as cu
from jaxface.heads.losses import loss_from_config
from jaxface.mesh import make_mesh
from jaxface.models import get_model
from jaxface.optim import make_optimizer
from jaxface.precision import LossScale, Policy
from jaxface.step import device_state, make_init_fn, make_train_step


def _problem(batch=32, rows=128, dim=256, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    s = 0.01 * jax.random.normal(k[0], (batch, rows))
    emb = jax.random.normal(k[1], (batch, dim))
    emb = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    w = 0.01 * jax.random.normal(k[2], (rows, dim))
    m = 0.001 * jax.random.normal(k[3], (rows, dim))
    c = jax.random.normal(k[4], (rows,))
    return s, emb, w, m, c


@pytest.mark.parametrize("precision", [jax.lax.Precision.HIGHEST, None])
@pytest.mark.parametrize(("apply", "batch"), [(1.0, 32), (0.0, 32), (1.0, 192)])
def test_kernel_equals_the_xla_formula(precision, apply, batch):
    """The kernel's blocks (64 rows x 128 columns, a [64, B] x [B, 128] product each, taken
    32 samples at a time) give the reference's W and m; a skipped step writes both back
    unchanged."""
    s, emb, w, m, c = _problem(batch=batch)
    hyper = cu.hyper_vector(-0.1, 0.9, 5e-4, apply, 0.5)
    want = cu.reference(s, emb, w, m, c, hyper, precision)
    got = cu.pallas_update(s, emb, w, m, c, hyper, precision, interpret=True)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=2e-8)
    if apply == 0.0:
        assert np.array_equal(got[0], w) and np.array_equal(got[1], m)
    else:
        assert not np.allclose(got[0], w)


def test_the_reference_is_sgd_on_the_centres_gradient():
    """reference's update is FusedSGD's maths on G = u (s^T e + c W), written out here."""
    s, emb, w, m, c = _problem(seed=1)
    hyper = cu.hyper_vector(-0.1, 0.9, 5e-4, 1.0, 0.25)
    g = 0.25 * (
        np.asarray(s, np.float64).T @ np.asarray(emb, np.float64) + np.asarray(c)[:, None] * w
    )
    m_want = g + 5e-4 * np.asarray(w) + 0.9 * np.asarray(m)
    w_want = np.asarray(w) - 0.1 * m_want
    w_got, m_got = cu.reference(s, emb, w, m, c, hyper, jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(m_got, m_want, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(w_got, w_want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("batch", "rows", "dim", "fits"),
    [(128, 617984, 512, True), (1024, 64, 128, True), (768, 128, 512, True),
     (32, 128, 128, True), (96, 128, 512, True), (80, 128, 512, False),
     (24, 128, 512, False), (8, 128, 512, False),
     (128, 100, 512, False), (128, 128, 200, False)],
)  # fmt: skip
def test_kernel_fits_only_shapes_it_tiles(batch, rows, dim, fits):
    assert cu.kernel_fits((batch, rows), (batch, dim)) is fits


def _setup(repo, precision, devices, loss="margin"):
    values = dict(num_classes=12, num_image=4000, batch_size=8, embedding_size=16,
                  precision=precision, warmup_epoch=0, num_devices=devices, loss=loss)  # fmt: skip
    cfg = load_config(repo / "configs/demo.py", {k: str(v) for k, v in values.items()})
    derived = derive(cfg, devices)
    mesh = make_mesh(devices)
    dtype = {"fp32": jnp.float32, "fp16": jnp.float16}[precision]
    model = get_model(cfg.network, embedding_size=16, policy=Policy(precision, dtype))
    tx, schedule = make_optimizer(cfg, derived)
    init = make_init_fn(model, tx, cfg.num_classes, derived.num_classes_padded)
    state = jax.jit(lambda s: device_state(init(s), mesh.size))(0)
    return mesh, model, tx, schedule, state, loss_from_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "devices", "loss"),
    [("fp32", 1, "margin"), ("fp16", 8, "margin"), ("fp32", 8, "magface")],
)
def test_step_through_the_cosines_equals_the_centres_own_gradient(repo, precision, devices, loss):
    """The step that updates the centres from the cosines' gradient (FusedSGD) against the
    one that differentiates the centres (the same optax chain, unfused), from the same state
    on the same batches: after one step every parameter and momentum slot alike to rounding
    (the centres 1.5e-7 relative seen); fp16's second step overflows (scale 2**40) and
    leaves everything as it was in both; the losses stay alike (later steps part slowly:
    lr 0.1 amplifies a rounding difference about tenfold a step). MagFace: a per-sample
    loss whose margin and regulariser depend on the embedding's norm."""
    from jaxface.data import SyntheticFaces

    mesh, model, tx, schedule, state, head = _setup(repo, precision, devices, loss)
    assert isinstance(tx, FusedSGD)
    if loss != "margin":
        state = state.replace(loss_state=head.init_state())
    fused = jax.jit(make_train_step(model, tx, schedule, head, 12, mesh))
    chain = jax.jit(make_train_step(model, tx.chain, schedule, head, 12, mesh))
    faces = SyntheticFaces(12, seed=0)
    a, b = state, state
    for i in range(3):
        overflow = precision == "fp16" and i == 1
        if precision == "fp16":
            scale = LossScale(jnp.float32(2.0 ** (40 if overflow else 10)), jnp.int32(0))
            a, b = a.replace(loss_scale=scale), b.replace(loss_scale=scale)
        images, labels = faces.batch(np.random.default_rng(i).integers(0, 12, 8), np.arange(8))
        before = a
        a, ma = fused(a, images, labels)
        b, mb = chain(b, images, labels)
        assert bool(ma["grads_finite"]) == bool(mb["grads_finite"]) == (not overflow)
        np.testing.assert_allclose(
            ma["loss"], mb["loss"], rtol=1e-4 if precision == "fp32" else 1e-3
        )
        if overflow:
            for got, old in zip(
                jax.tree.leaves(a.params), jax.tree.leaves(before.params), strict=True
            ):
                assert np.array_equal(got, old)
        if i == 0 or overflow:
            got = jax.tree_util.tree_flatten_with_path((a.params, a.opt_state))[0]
            for (path, x), y in zip(got, jax.tree.leaves((b.params, b.opt_state)), strict=True):
                if "head" in jax.tree_util.keystr(path):
                    atol = 1e-6 * float(np.max(np.abs(y)))
                    np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=str(path))
                elif precision == "fp32":
                    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=str(path))
                else:
                    # fp16's trunk rounds its gradients to 11 bits: a last-bit difference
                    # upstream moves a leaf by up to ~5e-3 of its norm (small ones: absolute).
                    close = np.allclose(x, y, rtol=1e-2, atol=1e-5)
                    assert close or rel_err(x, y) < 1e-2, (path, rel_err(x, y))


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["kernel", "other"])
def test_a_kernel_that_does_not_compile_gives_way_to_the_plain_step(
    repo, tmp_path, monkeypatch, capsys, failure
):
    """On a GPU whose Triton cannot build the kernel (its shared memory, here simulated at
    trace time), the trainer says so in one line and trains on with the centres
    differentiated; any other failure of the first step is left alone."""
    from jaxface import step as step_module
    from jaxface.train import train

    monkeypatch.setattr(step_module, "head_kernel_available", lambda mesh: True)
    message = {
        "kernel": "RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 106496, "
        "available: 101376",
        "other": "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 5.2GiB",
    }[failure]

    def broken(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(cu, "pallas_update", broken)
    values = dict(num_classes=12, num_image=4000, batch_size=4, embedding_size=128,
                  max_steps=3, frequent=1, val_targets="[]", progress="plain",
                  tensorboard=False, output=str(tmp_path / "run"), warmup_epoch=0,
                  rec="synthetic", pack_synthetic=False, num_workers=0)  # fmt: skip
    cfg = load_config(repo / "configs/demo.py", {k: str(v) for k, v in values.items()})
    if failure == "other":
        with pytest.raises(RuntimeError, match="Out of memory"):
            train(cfg)
        return
    summary = train(cfg)
    said = capsys.readouterr()
    lines = [x for x in (said.out + said.err).splitlines() if "does not compile" in x]
    assert len(lines) == 1 and "fused_head_update=false" in lines[0], said
    assert "Shared memory size limit exceeded" in lines[0]
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])


def test_row_terms_round_s_and_say_whether_it_is_finite():
    """s in the asked dtype, c from that s (-a_j sum_b s_bj cos_bj), and `finite`
    false for an inf or a NaN anywhere in the cosines' gradient (fp16 overflow), read from
    the column sums c is made of."""
    rng = np.random.default_rng(0)
    dcos = rng.normal(size=(8, 64)).astype(np.float32)
    cos = rng.uniform(-1, 1, size=(8, 64)).astype(np.float32)
    sum_sq = rng.uniform(0.5, 2.0, size=64).astype(np.float32)
    inv_norm = 1 / np.sqrt(sum_sq)
    s, c, finite = cu.row_terms(dcos, cos, inv_norm, sum_sq, jnp.bfloat16)
    assert s.dtype == jnp.bfloat16 and bool(finite)
    np.testing.assert_array_equal(s, (dcos * inv_norm).astype(jnp.bfloat16))
    stored = np.asarray(s, np.float32)
    np.testing.assert_allclose(c, -inv_norm * np.sum(stored * cos, axis=0), rtol=1e-5)
    for bad in (np.inf, -np.inf, np.nan):
        broken = dcos.copy()
        broken[3, 17] = bad
        assert not bool(cu.row_terms(broken, cos, inv_norm, sum_sq)[2])


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "want"),
    [
        ("bf16", jnp.bfloat16, True, jnp.bfloat16),
        ("bf16", jnp.bfloat16, False, jnp.float32),  # full float32 products asked for
        ("fp16", jnp.float16, True, jnp.float32),  # divided by the norms it overflows fp16
        ("fp32", jnp.float32, True, jnp.float32),
    ],
)
def test_the_cosines_gradient_is_stored_in_bfloat16_only_under_bf16(name, dtype, tf32, want):
    assert Policy(name, dtype, tf32=tf32).cosine_grad_dtype == want
