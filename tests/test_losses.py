"""Per-sample losses (AdaFace, CurricularFace, MagFace, ElasticFace) in the class-sharded
head: against NumPy float64 statements of the official forward passes, sharded against
dense, gradients against the official code's autograd (torchref), torchref parity, resume."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import head_loss  # noqa: F401 - the head as the step runs it (see below)

from jaxface.config import ConfigError, load_config
from jaxface.heads import (
    AdaFace,
    CurricularFace,
    ElasticFace,
    MagFace,
    gather_rows,
    init_class_centres,
    partial_fc_loss_and_state,
    sample_class_ids,
)
from jaxface.heads.losses import RowContext
from jaxface.mesh import batch_sharding, class_sharding, make_mesh

LOSSES = {
    "adaface": AdaFace(m=0.4, h=0.333, t_alpha=0.3),
    "curricularface": CurricularFace(m=0.5),
    "magface": MagFace(l_a=2.0, u_a=12.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
    "elasticface_arc": ElasticFace(kind="arc", m=0.5, std=0.05),
    "elasticface_cos": ElasticFace(kind="cos", m=0.35, std=0.05),
    "elasticface_arc_plus": ElasticFace(kind="arc", m=0.5, std=0.0175, plus=True),
    "elasticface_cos_plus": ElasticFace(kind="cos", m=0.35, std=0.02, plus=True),
}


def with_grad(loss, grad):
    return type(loss)(**{**loss.__dict__, "grad": grad})


def problem(num_classes=21, batch=16, dim=8, seed=0, devices=8):
    """Embeddings with norms spread over ~[2, 14] (so AdaFace's and MagFace's margins vary),
    centres with some targets pulled close (so CurricularFace has hard negatives and easy
    targets both)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(batch, dim))
    emb *= rng.uniform(2, 14, (batch, 1)) / np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, num_classes, batch).astype(np.int32)
    padded = -(-num_classes // devices) * devices
    centres = np.array(init_class_centres(jax.random.key(seed), num_classes, padded, dim))
    centres[labels[: batch // 2]] += (
        0.02 * emb[: batch // 2] / np.linalg.norm(emb[: batch // 2], axis=1, keepdims=True)
    )
    return emb.astype(np.float32), labels, centres.astype(np.float32)


# --- The official forward passes, written out in NumPy float64 ---------------------------


def _log_softmax_pick(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return logp[np.arange(len(labels)), labels]


def official_forward(loss, emb, centres, labels, state, margins=None):
    """(scaled logits [B, C], loss, new state) as the official code computes them, in
    float64, over the real classes `centres` [C, E]."""
    emb, w = np.asarray(emb, np.float64), np.asarray(centres, np.float64)
    norms = np.linalg.norm(emb, axis=1)
    cos = np.clip((emb / norms[:, None]) @ (w / np.linalg.norm(w, axis=1)[:, None]).T, -1, 1)
    rows, s = np.arange(len(labels)), loss.scale
    onehot = np.zeros_like(cos, bool)
    onehot[rows, labels] = True
    extra, new_state = 0.0, dict(state)
    if isinstance(loss, AdaFace):  # head.py
        eps = 1e-3
        cos = np.clip(cos, -1 + eps, 1 - eps)
        safe = np.clip(norms, 0.001, 100)
        a = loss.t_alpha
        mean = safe.mean() * a + (1 - a) * state["norm_mean"]
        std = safe.std(ddof=1) * a + (1 - a) * state["norm_std"]
        new_state = {"norm_mean": mean, "norm_std": std}
        scaler = np.clip((safe - mean) / (std + eps) * loss.h, -1, 1)
        m_arc = np.where(onehot, (loss.m * scaler * -1)[:, None], 0.0)
        out = np.cos(np.clip(np.arccos(cos) + m_arc, eps, math.pi - eps))
        out = out - np.where(onehot, (loss.m + loss.m * scaler)[:, None], 0.0)
    elif isinstance(loss, CurricularFace):  # head/metrics.py
        m = loss.m
        target = cos[rows, labels][:, None]
        cos_theta_m = target * math.cos(m) - np.sqrt(1 - target**2) * math.sin(m)
        mask = cos > cos_theta_m
        final = np.where(
            target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m
        )
        t = target.mean() * 0.01 + 0.99 * state["t"]
        new_state = {"t": t}
        out = cos.copy()
        out[mask] = cos[mask] * (t + cos[mask])
        out[rows, labels] = final[:, 0]
    elif isinstance(loss, MagFace):  # models/magface.py: MagLinear (easy margin), MagLoss
        x = np.clip(norms, loss.l_a, loss.u_a)[:, None]
        ada = (loss.u_m - loss.l_m) / (loss.u_a - loss.l_a) * (x - loss.l_a) + loss.l_m
        cos_m = cos * np.cos(ada) - np.sqrt(1 - cos**2) * np.sin(ada)
        cos_m = np.where(cos > 0, cos_m, cos)
        out = np.where(onehot, cos_m, cos)
        extra = loss.lambda_g * np.mean(1 / loss.u_a**2 * x + 1 / x)
    else:  # ElasticFace, utils/losses.py
        margin = np.asarray(margins, np.float64)
        if loss.plus:
            order = np.argsort(-cos[rows, labels], kind="stable")
            margin = np.sort(margin)[order]
        m_hot = np.where(onehot, margin[:, None], 0.0)
        out = np.cos(np.arccos(cos) + m_hot) if loss.kind == "arc" else cos - m_hot
    logits = out * s
    return logits, float(-np.mean(_log_softmax_pick(logits, labels)) + extra), new_state


def _init_state(loss):
    return {k: float(v) for k, v in loss.init_state().items()}


# --- jaxface: the sharded head, and a dense one-device statement of the same ops ----------


def sharded(loss, emb, labels, centres, state, key, mesh, num_classes, num_sample=None):
    """(loss, new state, grads w.r.t. embeddings and centres) of the head on `mesh`."""
    num_local = centres.shape[0] // mesh.size
    labels_s = jax.device_put(labels, batch_sharding(mesh))

    def fn(e, w):
        ids = sample_class_ids(
            labels_s,
            jax.random.key(7),
            num_classes=num_classes,
            num_local=num_local,
            num_sample=num_sample,
            mesh=mesh,
        )
        rows = gather_rows(w, ids, mesh=mesh)
        return partial_fc_loss_and_state(
            e,
            labels_s,
            rows,
            ids,
            margin=loss,
            num_classes=num_classes,
            num_local=num_local,
            mesh=mesh,
            loss_state=state,
            key=key,
        )

    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
    (value, new_state), (g_emb, g_w) = grad_fn(
        jax.device_put(emb, batch_sharding(mesh)), jax.device_put(centres, class_sharding(mesh))
    )
    return float(value), jax.device_get(new_state), np.asarray(g_emb), np.asarray(g_w)


def dense(loss, emb, labels, centres, state, key):
    """The same loss on one device without shard_map: every class in one block."""
    norms = jnp.sqrt(jnp.sum(emb**2, axis=1))
    w = centres / jnp.linalg.norm(centres, axis=1, keepdims=True)
    cos = jnp.clip(jnp.dot(emb / norms[:, None], w.T, precision="highest"), -1, 1)
    is_target = jax.nn.one_hot(labels, centres.shape[0], dtype=bool)
    target_cos = jax.lax.stop_gradient(cos[jnp.arange(len(labels)), labels])
    ctx = RowContext(norms=norms, target_cos=target_cos, state=state, key=key)
    info, new_state, extra = loss.rows(ctx)
    logits = loss.logits(cos, is_target, info)
    logp = jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]
    return -jnp.mean(logp) + extra, new_state


def assert_close(actual, expected, rtol=1e-4):
    expected = np.asarray(expected)
    atol = 1e-5 * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_and_state_match_the_official_code_over_three_steps(name):
    """Logits (dense) and loss (sharded, 8 devices) against the NumPy statement, state
    threaded through three consecutive steps on both sides."""
    loss = LOSSES[name]
    mesh = make_mesh(8)
    state_np, state_jax = _init_state(loss), loss.init_state()
    for step in range(3):
        emb, labels, centres = problem(seed=step)
        key = jax.random.key(100 + step)
        margins = np.asarray(loss.draw(key, len(labels))) if isinstance(loss, ElasticFace) else None
        real = centres[:21]
        want_logits, want_loss, state_np = official_forward(
            loss, emb, real, labels, state_np, margins
        )
        # Logits of the dense statement of jaxface's ops.
        norms = jnp.linalg.norm(emb, axis=1)
        w = real / np.linalg.norm(real, axis=1, keepdims=True)
        cos = jnp.clip(jnp.dot(emb / norms[:, None], w.T, precision="highest"), -1, 1)
        tc = cos[np.arange(len(labels)), labels]
        info, _, _ = loss.rows(RowContext(norms, tc, state_jax, key))
        got = loss.logits(cos, jax.nn.one_hot(labels, 21, dtype=bool), info)
        np.testing.assert_allclose(got, want_logits, rtol=2e-5, atol=2e-4)
        value, state_jax, _, _ = sharded(loss, emb, labels, centres, state_jax, key, mesh, 21)
        np.testing.assert_allclose(value, want_loss, rtol=2e-5)
        assert set(state_jax) == set(state_np)
        for k in state_np:
            np.testing.assert_allclose(state_jax[k], state_np[k], rtol=1e-5)


@pytest.mark.parametrize(
    "grad, sampling", [("straight_through", False), ("exact", False), ("exact", True)]
)
@pytest.mark.parametrize("name", list(LOSSES))
def test_sharded_equals_dense(name, grad, sampling):
    """8 devices against one device without shard_map: loss, new state, gradients. With
    sampling the dense computation runs over the classes the 8 devices sampled."""
    loss = with_grad(LOSSES[name], grad)
    mesh = make_mesh(8)
    num_classes = 125  # 16 rows per device, the last one 13 real
    emb, labels, centres = problem(num_classes=num_classes, batch=16)
    num_local, num_sample = centres.shape[0] // 8, None
    if sampling:
        # Two positives per block, so 8 of each device's 16 rows hold them and 6 negatives.
        labels = ((np.arange(16) % 8) * 16 + (np.arange(16) // 8) * 3).astype(np.int32)
        num_sample = 8
        ids = np.asarray(
            sample_class_ids(
                jax.device_put(labels, batch_sharding(mesh)),
                jax.random.key(7),
                num_classes=num_classes,
                num_local=num_local,
                num_sample=num_sample,
                mesh=mesh,
            )
        )
        picked = np.repeat(np.arange(8), num_sample) * num_local + ids
        assert np.all(picked < num_classes) and len(np.unique(picked)) == 64
    else:
        picked = np.arange(num_classes)
    state, key = loss.init_state(), jax.random.key(3)
    value, new_state, g_emb, g_w = sharded(
        loss, emb, labels, centres, state, key, mesh, num_classes, num_sample
    )
    dense_labels = np.searchsorted(picked, labels).astype(np.int32)
    assert np.array_equal(picked[dense_labels], labels)
    (ref, ref_state), (r_emb, r_w) = jax.value_and_grad(
        lambda e, w: dense(loss, e, dense_labels, w, state, key), argnums=(0, 1), has_aux=True
    )(emb, centres[picked])
    np.testing.assert_allclose(value, float(ref), rtol=1e-5)
    for k in ref_state:
        np.testing.assert_allclose(new_state[k], ref_state[k], rtol=1e-6)
    assert_close(g_emb, r_emb)
    full = np.zeros_like(centres)
    full[picked] = r_w
    assert_close(g_w, full)
    assert np.isfinite(g_w).all() and not np.any(g_w[num_classes:])


def test_adaface_statistics_are_the_global_batchs():
    loss = AdaFace(t_alpha=1.0)  # the new statistics alone
    emb, labels, centres = problem()
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    _, state, _, _ = sharded(loss, emb, labels, centres, loss.init_state(), None, make_mesh(8), 21)
    np.testing.assert_allclose(state["norm_mean"], norms.mean(), rtol=1e-5)
    np.testing.assert_allclose(state["norm_std"], norms.std(ddof=1), rtol=1e-5)
    first_device = norms[:2]
    assert abs(float(state["norm_mean"]) - first_device.mean()) > 1e-2


def test_elasticface_margins_are_reproducible_and_spread():
    loss = LOSSES["elasticface_arc"]
    a = np.asarray(loss.draw(jax.random.key(5), 4096))
    assert np.array_equal(a, np.asarray(loss.draw(jax.random.key(5), 4096)))
    assert abs(a.mean() - 0.5) < 5e-3 and abs(a.std() - 0.05) < 5e-3


# --- Gradients against the official code's autograd (torchref's modules, float64) ---------


def _torch_official(loss_name, loss, emb, centres, labels, margins):
    torch = pytest.importorskip("torch")
    from torchref import losses as tl

    st = loss.grad == "straight_through"
    if isinstance(loss, AdaFace):
        module = tl.AdaFaceLoss(loss.scale, loss.m, loss.h, loss.t_alpha, st)
    elif isinstance(loss, CurricularFace):
        module = tl.CurricularFaceLoss(loss.scale, loss.m, st)
    elif isinstance(loss, MagFace):
        module = tl.MagFaceLoss(loss.scale, loss.l_a, loss.u_a, loss.l_m, loss.u_m,
                                loss.lambda_g, st)  # fmt: skip
    else:
        module = tl.ElasticFaceLoss(loss.kind, loss.scale, loss.m, loss.std, loss.plus,
                                    straight_through=st)  # fmt: skip
        module.draw = lambda n: torch.from_numpy(np.asarray(margins, np.float64))
    module = module.double()
    e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(centres, dtype=torch.float64, requires_grad=True)
    lab = torch.from_numpy(labels).long()
    norms = e.norm(dim=1)
    cos = torch.nn.functional.linear(
        torch.nn.functional.normalize(e), torch.nn.functional.normalize(w)
    ).clamp(-1, 1)
    target_cos = cos.detach()[torch.arange(len(lab)), lab]
    logits, extra = module(cos, lab, norms, target_cos)
    value = torch.nn.functional.cross_entropy(logits, lab) + extra
    value.backward()
    return float(value.detach()), e.grad.numpy(), w.grad.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("grad", ["straight_through", "exact"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_match_the_official_autograd(name, grad):
    loss = with_grad(LOSSES[name], grad)
    emb, labels, centres = problem()
    key = jax.random.key(11)
    margins = np.asarray(loss.draw(key, len(labels))) if isinstance(loss, ElasticFace) else None
    value, _, g_emb, g_w = sharded(
        loss, emb, labels, centres, loss.init_state(), key, make_mesh(8), 21
    )
    ref, r_emb, r_w = _torch_official(name, loss, emb, centres[:21], labels, margins)
    np.testing.assert_allclose(value, ref, rtol=2e-5)
    assert_close(g_emb, r_emb, rtol=2e-3)
    assert_close(g_w[:21], r_w, rtol=2e-3)


def test_gradient_modes_differ_where_the_margin_depends_on_the_cosine():
    emb, labels, centres = problem()
    mesh = make_mesh(8)
    for name in ("adaface", "curricularface", "magface", "elasticface_arc"):
        loss = LOSSES[name]
        key = jax.random.key(1)
        st = sharded(with_grad(loss, "straight_through"), emb, labels, centres,
                     loss.init_state(), key, mesh, 21)  # fmt: skip
        ex = sharded(with_grad(loss, "exact"), emb, labels, centres, loss.init_state(), key,
                     mesh, 21)  # fmt: skip
        assert st[0] == pytest.approx(ex[0], rel=1e-6), name  # same value
        assert not np.allclose(st[3], ex[3], rtol=1e-3), name  # different gradients
    # The cosine margin's derivative is 1 either way.
    loss = LOSSES["elasticface_cos"]
    st = sharded(loss, emb, labels, centres, {}, jax.random.key(1), mesh, 21)
    ex = sharded(with_grad(loss, "exact"), emb, labels, centres, {}, jax.random.key(1), mesh, 21)
    assert_close(st[3], ex[3], rtol=1e-6)


# --- Config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("adaface_h", "-0.1", "'adaface_h'=-0.1 must be >= 0"),
        ("adaface_t_alpha", "0", "'adaface_t_alpha'=0.0 must be in \\(0, 1\\]"),
        ("adaface_t_alpha", "1.5", "'adaface_t_alpha'=1.5 must be in \\(0, 1\\]"),
        ("curricular_m", "2", "'curricular_m'=2.0 must be in \\[0, pi/2\\)"),
        ("elastic_std", "-0.1", "'elastic_std'=-0.1 must be >= 0"),
        ("loss", "sphereface2", "'loss'='sphereface2' must be one of margin, adaface"),
        (
            "low_res_augmentation_prob",
            "1.2",
            "'low_res_augmentation_prob'=1.2 must be in \\[0, 1\\]",
        ),
    ],
)
def test_bad_parameters_are_refused_naming_the_key(repo, key, value, message):
    with pytest.raises(ConfigError, match=f"--config.{key}: config key {message}") as info:
        load_config(repo / "configs/demo.py", {key: value})
    assert "\n" not in str(info.value)


def test_magface_range_and_filtering_are_refused(repo):
    with pytest.raises(ConfigError, match="'magface_u_a'=5.0 must be > magface_l_a=10.0"):
        load_config(repo / "configs/demo.py", {"loss": "magface", "magface_u_a": "5"})
    with pytest.raises(ConfigError, match="'interclass_filtering_threshold' applies to loss="):
        load_config(
            repo / "configs/demo.py",
            {"loss": "adaface", "interclass_filtering_threshold": "0.2"},
        )


def test_norm_losses_refuse_a_backbone_that_normalises(repo, monkeypatch):
    from jaxface import config

    monkeypatch.setattr(config, "NORMALISED_BACKBONES", frozenset({"iresnet_tiny"}))
    for loss in ("adaface", "magface"):
        with pytest.raises(ConfigError, match="reads the embedding's norm before normalisation"):
            load_config(repo / "configs/demo.py", {"loss": loss})
    load_config(repo / "configs/demo.py", {"loss": "curricularface"})  # needs no norm


def test_job_configs_load(repo):
    for name, loss in [
        ("adaface_r100", "adaface"),
        ("curricularface_r50", "curricularface"),
        ("magface_r50", "magface"),
        ("elasticface_r50", "elasticface_arc"),
    ]:
        assert load_config(repo / f"configs/{name}.py").loss == loss


# --- One training step: jaxface against torchref -------------------------------------------

STEP_LOSSES = {
    "adaface": {"adaface_t_alpha": "0.5"},
    "curricularface": {},
    "magface": {"magface_l_a": "1", "magface_u_a": "30"},
    "elasticface_arc": {},
    "elasticface_cos": {"elastic_m": "0.35", "elastic_plus": "true", "elastic_std": "0.02"},
}


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("grad", ["straight_through", "exact"])
@pytest.mark.parametrize("name", list(STEP_LOSSES))
def test_one_training_step_matches_torchref(repo, name, grad):
    torch = pytest.importorskip("torch")
    from conftest import jax_train_step, rel_err
    from conftest import random_images as images
    from test_torchref_parity import randomised

    from jaxface.config import derive
    from jaxface.convert import flax_to_torch, torch_to_flax
    from jaxface.heads import loss_from_config
    from jaxface.models import get_model as jax_model
    from torchref.parity import reference_step

    torch.set_float32_matmul_precision("highest")
    num_classes = 13
    cfg = load_config(
        repo / "configs/demo.py",
        {"network": "iresnet_tiny", "embedding_size": "32", "num_classes": str(num_classes),
         "batch_size": "8", "num_image": "800", "lr": "0.1", "warmup_epoch": "0",
         "loss": name, "margin_grad": grad, **STEP_LOSSES[name]},
    )  # fmt: skip
    derived = derive(cfg, 1)
    model = randomised(cfg.network, seed=1, embedding_size=cfg.embedding_size)
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    centres = (0.01 * rng.standard_normal((num_classes, cfg.embedding_size))).astype(np.float32)
    batch = images(derived.global_batch, seed=4)
    labels = rng.integers(0, num_classes, derived.global_batch).astype(np.int32)

    loss = loss_from_config(cfg)
    seed_key = jax.random.key(0)
    draw = None
    if isinstance(loss, ElasticFace):  # the key the step gives the loss (jaxface.step)
        step_key = jax.random.fold_in(jax.random.fold_in(seed_key, 0), 0x10557)
        margins = np.asarray(loss.draw(step_key, len(labels)))
        draw = lambda n: torch.from_numpy(margins.copy())  # noqa: E731

    ref = reference_step(cfg, derived, state_dict, centres, batch, labels, 1, loss_draw=draw)

    params, stats = torch_to_flax(state_dict, cfg.network)
    model = jax_model(cfg.network, embedding_size=32)
    new, jax_loss = jax_train_step(
        cfg, derived, model, params, stats, centres, batch, labels, make_mesh(1), loss=loss
    )

    assert abs(jax_loss - ref["loss"]) / abs(ref["loss"]) <= 1e-5
    got = flax_to_torch(new.params["backbone"], new.batch_stats, cfg.network)
    for key, expected in ref["state_dict"].items():
        if not key.endswith("num_batches_tracked"):
            assert rel_err(got[key], expected) <= 1e-4, key
    assert rel_err(new.params["head"]["centres"], ref["centres"]) <= 1e-4
    names = {"batch_mean": "norm_mean", "batch_std": "norm_std", "t": "t"}
    assert {names[k] for k in ref["loss_state"]} == set(new.loss_state)
    for k, v in ref["loss_state"].items():
        np.testing.assert_allclose(new.loss_state[names[k]], v.item(), rtol=1e-5)


# --- Resume keeps the running state -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adaface", "curricularface", "elasticface_arc"])
def test_resume_keeps_the_loss_state(repo, tmp_path, name):
    from jaxface.train import train

    def cfg(out, **overrides):
        base = dict(
            num_classes=12, num_image=4000, batch_size=4, embedding_size=32, frequent=1,
            val_targets="[]", progress="plain", output=str(out), warmup_epoch=0, lr=0.1,
            checkpoint_every=3, tensorboard=False, rec="synthetic", pack_synthetic=False,
            num_workers=0, num_devices=1, loss=name, adaface_t_alpha=0.3,
        )  # fmt: skip
        base.update(overrides)
        return load_config(repo / "configs/demo.py", {k: str(v) for k, v in base.items()})

    def losses(summary):
        return {r["step"]: r["loss"] for r in summary["history"]}

    full = train(cfg(tmp_path / "full", max_steps=6))
    first = train(cfg(tmp_path / "part", max_steps=3))
    assert losses(first) == {s: losses(full)[s] for s in (1, 2, 3)}
    resumed = train(cfg(tmp_path / "part", max_steps=6, resume=True))
    assert losses(resumed) == {s: losses(full)[s] for s in (4, 5, 6)}
    want = jax.device_get(full["state"].loss_state)
    got = jax.device_get(resumed["state"].loss_state)
    assert set(got) == set(want) == set(LOSSES[name].init_state())
    for k in want:
        assert float(got[k]) == float(want[k]), k
    if want:  # the state moved from its initial value
        init = LOSSES[name].init_state()
        assert any(float(want[k]) != float(init[k]) for k in want)


# --- AdaFace's augmentation in the host loader ----------------------------------------------


def _ada_loader(probs, **kw):
    from jaxface.data.loader import HostLoader
    from jaxface.data.sources import SyntheticDataset

    ds = SyntheticDataset(num_classes=4, num_image=256, seed=0)
    return HostLoader(ds, 64, seed=kw.pop("seed", 0), flip=False, adaface=probs, **kw)


def test_adaface_augmentation_is_deterministic_and_follows_the_global_batch():
    plain = _ada_loader(None).batch(0)[0]
    aug = _ada_loader((0.5, 0.5, 0.5)).batch(0)[0]
    np.testing.assert_array_equal(_ada_loader((0.5, 0.5, 0.5)).batch(0)[0], aug)
    changed = np.any(aug != plain, axis=(1, 2, 3))
    assert 0.5 < changed.mean() < 1.0  # 1 - 0.5^3 of the rows, about 0.875
    np.testing.assert_array_equal(_ada_loader((0.0, 0.0, 0.0)).batch(0)[0], plain)
    # A process's rows equal its slice of the single-process batch.
    part = _ada_loader((0.5, 0.5, 0.5), process_index=1, process_count=4).batch(0)[0]
    np.testing.assert_array_equal(part, aug[16:32])
    assert not np.array_equal(_ada_loader((0.5, 0.5, 0.5)).batch(1)[0], aug)


def test_adaface_crop_keeps_the_box_in_place_and_blacks_out_the_rest():
    from jaxface.data import adaface_augment

    params = adaface_augment.draw_params(0, 0, 512, (1.0, 0.0, 0.0), 112)
    i, j, h, w = params["ada_crop"].T
    assert np.all(h > 0) and np.all(i + h <= 112) and np.all(j + w <= 112)
    area = h * w / 112**2
    assert area.min() >= 0.19 and area.max() <= 1.0 and 0.5 < area.mean() < 0.7
    ratio = w / h
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4
    image = np.full((112, 112, 3), 200, np.uint8)
    out = adaface_augment.apply(image, params, 0)
    assert np.all(out[i[0] : i[0] + h[0], j[0] : j[0] + w[0]] == 200)
    assert out.sum() == 200 * 3 * h[0] * w[0]


def test_adaface_low_resolution_and_photometric():
    from jaxface.data import adaface_augment

    params = adaface_augment.draw_params(1, 0, 256, (0.0, 1.0, 1.0), 112)
    side = params["ada_low"][:, 0]
    assert side.min() >= 22 and side.max() <= 112
    assert sorted(np.unique(params["ada_order"][0])) == [0, 1, 2, 3]
    assert np.all((params["ada_factors"] >= 0.5) & (params["ada_factors"] <= 1.5))
    grey = np.full((112, 112, 3), 100, np.uint8)  # contrast and saturation leave it alone
    only_photo = {**params, "ada_low": np.zeros_like(params["ada_low"])}
    out = adaface_augment.apply(grey, only_photo, 0)
    b = params["ada_factors"][0, 0]
    assert abs(int(out[0, 0, 0]) - min(255, round(100 * b))) <= 1
