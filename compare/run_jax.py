"""One jaxface row: the trainer's own step (sharded state, donated, jitted) on a D-device
mesh, fed a batch that already lives on the devices, or the real host loader."""

from __future__ import annotations

import itertools
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, version

import jax

from compare.capability import unsupported
from compare.timing import measure, random_batches
from compare.variants import COLUMNS
from jaxface import setup
from jaxface.data.training import make_loader, prepare
from jaxface.feed import DeviceFeed
from jaxface.mesh import make_mesh


def device_info() -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{jax.device_count()} x {device.device_kind}",
        "device_name": device.device_kind,
        "platform": device.platform,
        "versions": _versions(),
    }


def build(spec: dict, cfg):
    """(jitted step, initial state, batch iterator, close, derived config): the trainer's
    own pieces (`jaxface.setup.build`) for one row."""
    compute, tf32, _, _ = COLUMNS[spec["precision"]]
    cfg = cfg.replace(precision=compute, tf32=tf32, batch_size=spec["batch"])
    run = setup.build(cfg, make_mesh(spec["devices"]))
    batches, close = _batches(spec, cfg, run.derived, run.data_sharding)
    return run.train_step, run.init_state(), batches, close, run.derived


def run(spec: dict, cfg) -> dict:
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
    if spec["data"] == "rec":
        prepare(cfg)
        loader = make_loader(cfg, derived.global_batch)  # the trainer's own loader
        feed = DeviceFeed(loader.batch, sharding, 0, 1 << 40)

        def close():
            feed.close()
            loader.close()

        return feed, close
    pool = [
        (jax.device_put(images, sharding), jax.device_put(labels, sharding))
        for images, labels in random_batches(cfg, derived.global_batch, spec.get("pool", 8))
    ]
    return itertools.cycle(pool), lambda: None


def _versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax"):
        with suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
