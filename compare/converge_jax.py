"""One jaxface run of python -m compare.converge: the trainer's own step (`jaxface.setup`)
from the shared initial weights, over the shared loader's batches, every step's metrics
kept, verification and final embeddings as the trainer computes them."""

from __future__ import annotations

import time
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import numpy as np

from compare.converge_run import Curves, read_init, write_init
from jaxface import setup
from jaxface.convert import flax_to_torch, torch_to_flax
from jaxface.data.training import make_loader
from jaxface.data.verification import load_bin
from jaxface.heads import sample_class_ids
from jaxface.mesh import make_mesh
from jaxface.verify import embed_images


def run(spec: dict, cfg, say) -> tuple[dict, dict]:
    """(result, final embeddings by verification set) of one run that `spec` describes."""
    cfg = cfg.replace(precision=spec["compute"], tf32=spec["tf32"])
    built = setup.build(cfg, make_mesh(1))
    state = _initial_state(built, Path(spec["init"]), spec["seed"])
    if spec["steps"] == 0:  # only the initial weights were asked for
        return {"device": _device()}, {}
    targets = [(Path(p).stem, *load_bin(p)) for p in spec["val_paths"]]
    draws = _Draws(built, spec) if spec.get("draws_out") else None
    curves = Curves(built.derived.global_batch)
    loader = make_loader(cfg, built.derived.global_batch)
    t_start = time.perf_counter()
    try:
        for step in range(1, spec["steps"] + 1):
            images, labels = loader.batch(step - 1)
            if draws is not None:  # before the step: the state is donated to it
                draws.record(state, labels)
            state, metrics = built.train_step(state, images, labels)
            curves.pending.append(metrics)
            if step == 1:
                jax.block_until_ready(metrics)
                curves.compile_s = time.perf_counter() - t_start
                say(f"step 1 compiled and ran in {curves.compile_s:.1f} s")
                curves.restart_clock(step)
            if step % cfg.frequent == 0 or step == spec["steps"]:
                fetched = jax.device_get(curves.pending)
                curves.pending.clear()
                curves.add(
                    step,
                    loss=[float(m["loss"]) for m in fetched],
                    lr=[float(m["lr"]) for m in fetched],
                    grad_norm=[float(m["backbone_grad_norm"]) for m in fetched],
                    skipped=[not bool(m["grads_finite"]) for m in fetched],
                )
                say(curves.progress(step, spec["steps"]))
            if targets and (step % cfg.verbose == 0 or step == spec["steps"]):
                final = curves.add_val(step, targets, _embedder(built, state), say)
                curves.restart_clock(step)
    finally:
        loader.close()
    if draws is not None:
        draws.save(Path(spec["draws_out"]))
    result = {**curves.as_dict(), "wall_s": time.perf_counter() - t_start, "device": _device()}
    return result, final if targets else {}


def _embedder(built, state):
    """uint8 images -> float32 embeddings of the state's backbone, as the trainer's Verifier."""
    params, stats = built.backbone(state)
    batch = built.derived.global_batch
    return lambda images: embed_images(built.embed, params, stats, images, built.mesh, batch)


def _initial_state(built, path: Path, seed: int):
    """The state at `seed`, its backbone, BatchNorm statistics and class centres taken from
    the shared file (`path`) if another run wrote it, else written there (torch's layout)."""
    state = built.init_state(seed)
    params, stats = built.backbone(state)
    network, num_classes = built.cfg.network, built.cfg.num_classes
    if not path.exists():
        saved = built.to_saved(state)
        centres = np.asarray(jax.device_get(saved.params["head"]["centres"]))[:num_classes]
        write_init(
            path, flax_to_torch(jax.device_get(params), jax.device_get(stats), network), centres
        )
        return state
    state_dict, centres = read_init(path)
    params, stats = torch_to_flax(state_dict, network, built.cfg.embedding_size)
    saved = built.to_saved(state)
    padded = np.zeros(saved.params["head"]["centres"].shape, np.float32)
    padded[:num_classes] = centres
    put = jax.device_put
    head = {"centres": put(padded, built.shardings.params["head"]["centres"])}
    backbone = put(params, built.shardings.params["backbone"])
    stats = put(stats, built.shardings.batch_stats)
    return built.to_step(
        saved.replace(
            params={**saved.params, "backbone": backbone, "head": head}, batch_stats=stats
        )
    )


class _Draws:
    """The class ids jaxface's Partial FC samples at each step, for torchref to take.

    The step does not return them; they are drawn again here from the same key as
    `jaxface.step.make_train_step` derives it (the state's key folded with the step
    counter, split into dropout and sampling keys), so torchref scores the same rows."""

    def __init__(self, built, spec):
        derived = built.derived
        self.rows: list[np.ndarray] = []

        def ids(rng, step, labels):
            key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
            _, sample_key = jax.random.split(key)
            return sample_class_ids(
                labels,
                sample_key,
                num_classes=built.cfg.num_classes,
                num_local=derived.num_local_classes,
                num_sample=derived.num_sample,
                mesh=built.mesh,
            )

        self._ids = jax.jit(ids)

    def record(self, state, labels) -> None:
        self.rows.append(np.asarray(jax.device_get(self._ids(state.rng, state.step, labels))))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.stack(self.rows))
        tmp.replace(path)


def _device() -> str:
    device = jax.devices()[0]
    versions = []
    for name in ("jax", "jaxlib"):
        with suppress(PackageNotFoundError):
            versions.append(f"{name} {version(name)}")
    return f"{device.device_kind} ({', '.join(versions)})"
