"""The multi-device step's own pieces: gradient buckets in backward order, BatchNorm
statistics kept per device, gradients summed in the configured dtype."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from conftest import random_images, rel_err

from jaxface.config import load_config
from jaxface.grad_buckets import backward_buckets, flatten, forward_order
from jaxface.mesh import make_mesh
from jaxface.models import IMAGE_SIZE, normalize_images
from jaxface.setup import build


def _run(repo, devices=8, **overrides):
    base = dict(
        num_classes=24, num_image=4000, batch_size=4, embedding_size=16, warmup_epoch=0,
        lr=0.1, rec="synthetic", pack_synthetic=False, num_workers=0, val_targets="[]",
    )  # fmt: skip
    base.update(overrides)
    cfg = load_config(repo / "configs/demo.py", {k: str(v) for k, v in base.items()})
    return build(cfg, make_mesh(devices))


def _batch(run, seed=0):
    n = run.derived.global_batch
    images = random_images(n, seed)
    labels = np.random.default_rng(seed).integers(0, run.cfg.num_classes, n).astype(np.int32)
    sharding = run.data_sharding
    return jax.device_put(images, sharding), jax.device_put(labels, sharding), images


def test_buckets_follow_the_backward_pass(repo):
    run = _run(repo)
    state = run.init_state()
    backbone, stats = run.backbone(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(backbone)]
    image = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    order = forward_order(
        lambda p, s, x: run.model.apply({"params": p, "batch_stats": s}, x),
        backbone,
        stats,
        image,
    )
    assert sorted(order) == list(range(len(paths)))
    named = [paths[i] for i in order]
    # The stem first, the embedding layers last: the forward pass's order, not the tree's
    # (which sorts "bn1" < "conv1" < "fc" < "features" < "layer1").
    assert "conv1" in named[0] and "features" in named[-1]
    assert named.index("['fc']['kernel']") > max(i for i, p in enumerate(named) if "layer4" in p)

    sizes = [x.size for x in jax.tree.leaves(backbone)]
    cap = sum(sizes) * 4 // 5  # about five buckets
    buckets = backward_buckets(sizes, order, cap)
    assert sorted(i for b in buckets for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) * 4 >= cap for b in buckets[:-1])
    assert order[-1] in buckets[0] and order[0] in buckets[-1]  # the last layer's first
    assert all(b == sorted(b) for b in buckets)

    grads = jax.tree.map(lambda x: x + 1.0, backbone)
    flat = flatten(grads, buckets)
    assert [v.shape[0] for v in flat.vectors] == [sum(sizes[i] for i in b) for b in buckets]
    back = flat.tree(backbone)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(grads), strict=True):
        np.testing.assert_array_equal(a, b)


def test_each_device_keeps_its_own_batchnorm_statistics(repo):
    """As each DDP rank (arcface_torch: no sync BN, broadcast_buffers=False): device d's
    running statistics are updated from device d's images only; they are read, saved and
    exported as the devices' mean."""
    run = _run(repo)
    state = run.init_state()
    params0, stats0 = run.backbone(state)
    images, labels, host_images = _batch(run)
    state, _ = run.train_step(state, images, labels)
    per_device = jax.device_get(state.batch_stats)
    leaves = jax.tree.leaves(per_device)
    assert all(x.shape[0] == 8 for x in leaves)
    assert state.batch_stats["bn1"]["mean"].sharding.spec[0] == "data"

    model = run.model.clone(bn_groups=1)
    local = host_images.shape[0] // 8

    @jax.jit
    def one_device(x):
        x = normalize_images(x, run.policy.compute_dtype)
        _, updates = model.apply(
            {"params": params0, "batch_stats": stats0}, x, train=True, mutable=["batch_stats"]
        )
        return updates["batch_stats"]

    for d in (0, 5):
        want = one_device(host_images[d * local : (d + 1) * local])
        for got, exp in zip(
            jax.tree.leaves(jax.tree.map(lambda x, d=d: x[d], per_device)),
            jax.tree.leaves(want),
            strict=True,
        ):
            np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)
    # Different images, different statistics: nothing averaged them.
    assert not np.allclose(per_device["bn1"]["mean"][0], per_device["bn1"]["mean"][5])

    saved = run.to_saved(state)
    for s, x in zip(jax.tree.leaves(saved.batch_stats), leaves, strict=True):
        assert s.shape == x.shape[1:]
        np.testing.assert_allclose(s, x.mean(axis=0), rtol=1e-6, atol=1e-7)
    # A resume (on any device count) starts every device from the saved mean.
    for devices in (8, 4):
        other = _run(repo, devices=devices) if devices != 8 else run
        back = other.to_step(jax.device_get(saved))  # as a restore reads it
        pairs = zip(
            jax.tree.leaves(saved.batch_stats), jax.tree.leaves(back.batch_stats), strict=True
        )
        for s, x in pairs:
            assert x.shape == (devices, *s.shape)
            np.testing.assert_array_equal(np.asarray(x), np.broadcast_to(s, x.shape))


def _bucket_dtypes(lowered_text: str) -> set[str]:
    """Element types of the program's 1-D all-reduces of at least 1,000 elements (the
    gradient buckets; the head's per-sample sums are shorter here). Read from the lowered
    program: XLA:CPU itself widens a bf16 all-reduce to float32 when it compiles it."""
    found = re.findall(
        r"stablehlo.all_reduce.*?\}\) : \(tensor<(\d+)x(\w+)>", lowered_text, flags=re.DOTALL
    )
    return {dtype for n, dtype in found if int(n) >= 1000}


def test_gradients_are_summed_in_float32_or_bf16_as_configured(repo):
    """fp32 by default, bf16 on request: the step's gradient all-reduces carry that dtype,
    and one update on 8 devices equals the 1-device update to float32 rounding with fp32,
    to bf16 rounding of each device's share with bf16 (sync BN, fp32 compute: where the
    sum happens is the only difference)."""
    common = dict(sync_bn=True, lr=0.02, warmup_epoch=0)
    runs = {
        "one": _run(repo, devices=1, batch_size=32, **common),
        "fp32": _run(repo, grad_reduce="fp32", **common),
        "bf16": _run(repo, grad_reduce="bf16", **common),
    }
    assert _bucket_dtypes(runs["fp32"].lower().as_text()) == {"f32"}
    assert _bucket_dtypes(runs["bf16"].lower().as_text()) == {"bf16"}

    updates = {}
    for name, run in runs.items():
        state = run.init_state()
        before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(run.backbone(state)[0])])
        images, labels, _ = _batch(run)
        state, _ = run.train_step(state, images, labels)
        after = np.concatenate([np.ravel(x) for x in jax.tree.leaves(run.backbone(state)[0])])
        updates[name] = after - before
    fp32, bf16 = rel_err(updates["fp32"], updates["one"]), rel_err(updates["bf16"], updates["one"])
    # Measured on this machine: 1.3e-4 (float32 sums in another order, under the tests'
    # -O0 XLA: see conftest) and 2.4e-3 (each device's share rounded to bf16's 8 bits).
    assert fp32 < 5e-4 and 1e-3 < bf16 < 1e-2, (fp32, bf16)


def test_the_step_holds_kernels_output_channel_first_and_saves_them_as_the_model_has_them(repo):
    run = _run(repo, devices=2)
    initial = jax.device_get(run.init(0))  # as saved: Flax's HWIO kernels
    state = run.to_step(initial)
    held = state.params["backbone"]["conv1"]["kernel"]
    assert held.shape == (8, 3, 3, 3)  # iresnet_tiny's stem: 3x3, 3 -> 8 channels, OHWI
    assert initial.params["backbone"]["conv1"]["kernel"].shape == (3, 3, 3, 8)
    saved = jax.device_get(run.to_saved(state))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(initial), strict=True):
        np.testing.assert_array_equal(a, b)
    backbone, _ = run.backbone(state)
    np.testing.assert_array_equal(
        backbone["conv1"]["kernel"], initial.params["backbone"]["conv1"]["kernel"]
    )
