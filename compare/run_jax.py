"""One jaxface row: the trainer's own step (sharded state, donated, jitted) on a D-device
mesh, fed a batch that already lives on the devices, or the real host loader."""

from __future__ import annotations

import numpy as np

from compare.capability import unsupported
from compare.timing import measure
from compare.variants import COLUMNS


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {
        "device": f"{jax.device_count()} x {device.device_kind}",
        "device_name": device.device_kind,
        "platform": device.platform,
        "versions": _versions(),
    }


def build(spec: dict, cfg):
    """(jitted step, initial state, batch iterator, close, derived config): the trainer's
    own pieces for one row."""
    import jax

    from jaxface.config import derive
    from jaxface.heads import margin_from_config
    from jaxface.mesh import batch_sharding, make_mesh, replicated
    from jaxface.models import get_model
    from jaxface.optim import make_optimizer
    from jaxface.precision import policy_from_config
    from jaxface.step import make_init_fn, make_train_step, state_shardings

    compute, tf32, _, _ = COLUMNS[spec["precision"]]
    cfg = cfg.replace(precision=compute, tf32=tf32, batch_size=spec["batch"])
    mesh = make_mesh(spec["devices"])
    derived = derive(cfg, mesh.size)
    model = get_model(
        cfg.network,
        embedding_size=cfg.embedding_size,
        policy=policy_from_config(cfg),
        bn_groups=1 if cfg.sync_bn else mesh.size,
        remat=cfg.remat,
    )
    tx, schedule = make_optimizer(cfg, derived)
    init = make_init_fn(model, tx, cfg.num_classes, derived.num_classes_padded)
    shardings = state_shardings(jax.eval_shape(init, 0), mesh)
    state = jax.jit(init, out_shardings=shardings)(cfg.seed)
    step_fn = jax.jit(
        make_train_step(
            model,
            tx,
            schedule,
            margin_from_config(cfg),
            cfg.num_classes,
            mesh,
            num_sample=derived.num_sample,
        ),
        donate_argnums=0,
        out_shardings=(shardings, replicated(mesh)),
    )
    batches, close = _batches(spec, cfg, derived, batch_sharding(mesh))
    return step_fn, state, batches, close, derived


def run(spec: dict, cfg) -> dict:
    import jax

    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    info = device_info()
    why = unsupported(spec["precision"], device.platform, capability and float(capability))
    if why:
        return {**info, "skipped": why}
    step_fn, state, batches, close, derived = build(spec, cfg)
    holder = {"state": state}

    def step():
        images, labels = next(batches)
        holder["state"], metrics = step_fn(holder["state"], images, labels)
        return metrics["loss"]

    try:
        result = measure(
            step, jax.block_until_ready, spec["warmup"], spec["steps"], derived.global_batch
        )
        result["loss"] = float(step())
    finally:
        close()
    stats = device.memory_stats() or {}
    result["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
    return {**info, **result}


def _batches(spec, cfg, derived, sharding):
    """(an endless iterator of (images, labels) already on the mesh, a close function)."""
    import jax

    if spec["data"] == "rec":
        from jaxface.feed import DeviceFeed
        from jaxface.train import _make_loader

        loader = _make_loader(cfg, derived, is_main=True)  # the trainer's own loader
        feed = DeviceFeed(loader.batch, sharding, 0, 1 << 40)

        def close():
            feed.close()
            loader.close()

        return feed, close
    rng = np.random.default_rng(cfg.seed)
    shape = (derived.global_batch, 112, 112, 3)
    images = jax.device_put(rng.integers(0, 256, shape, np.uint8), sharding)
    labels = jax.device_put(
        rng.integers(0, cfg.num_classes, derived.global_batch).astype(np.int32), sharding
    )
    return iter(lambda: (images, labels), None), lambda: None


def _versions() -> dict:
    from contextlib import suppress
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax"):
        with suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
