"""Tests run on CPU with 8 virtual devices, so sharding is exercised without a GPU."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is first imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    # LLVM at -O0: compiles take a sixth of the time; the tests run few steps of small
    # models, so compile time dominates. It changes float32 summation order (first-layer
    # gradients move by ~1e-3 relative): tight parity tests compile at the default level.
    + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, this process and the processes tests start: many
# tests compile the same small train step again (a run, then its resume; two processes,
# then one). Fresh per session, so nothing carries over between runs of the suite.
_CACHE = tempfile.mkdtemp(prefix="jaxface-test-jit-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit turns on jax's file lock around every read and write of the cache: without
# it, a process could read an entry another is still writing (a warning on stderr, which
# tests that want exactly one line there would see).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxface.data.synthetic import SyntheticFaces, write_synthetic_bin  # noqa: E402
from jaxface.heads import (  # noqa: E402
    gather_rows,
    margin_from_config,
    partial_fc_loss,
    sample_class_ids,
)
from jaxface.mesh import batch_sharding, class_sharding  # noqa: E402
from jaxface.optim import make_optimizer  # noqa: E402
from jaxface.precision import LossScale  # noqa: E402
from jaxface.step import (  # noqa: E402
    TrainState,
    device_state,
    make_train_step,
    saved_state,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def small_val_bin(tmp_path) -> Path:
    """A 40-pair synthetic verification set for the tests' 12-class demo runs (seed 2048)."""
    path = tmp_path / "small_val.bin"
    write_synthetic_bin(path, SyntheticFaces(12, seed=2048), 4000, 40)
    return path


def head_loss(
    emb, labels, centres, *, margin, num_classes, mesh, num_sample=None, key=None, **kwargs
):
    """The class-sharded head as the train step runs it: pick rows, gather them, score."""
    num_local = centres.shape[0] // mesh.size
    ids = sample_class_ids(
        labels, key, num_classes=num_classes, num_local=num_local, num_sample=num_sample, mesh=mesh
    )
    rows = gather_rows(centres, ids, mesh=mesh)
    return partial_fc_loss(
        emb,
        labels,
        rows,
        ids,
        margin=margin,
        num_classes=num_classes,
        num_local=num_local,
        mesh=mesh,
        **kwargs,
    )


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """n uint8 NHWC 112 x 112 images of uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def jax_train_step(cfg, derived, model, params, stats, centres, batch, labels, mesh, loss=None):
    """One jaxface training step (`make_train_step`, dense head) from the given weights, as
    the parity tests compare it with torchref's: (new state on the host, loss). `loss`: the
    head's loss (default: the config's combined margin), with its initial running state."""
    loss = margin_from_config(cfg) if loss is None else loss
    tx, schedule = make_optimizer(cfg, derived)
    all_params = {"backbone": params, "head": {"centres": centres}}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=all_params,
        batch_stats=stats,
        opt_state=tx.init(all_params),
        rng=jax.random.key_data(jax.random.key(0)),
        loss_scale=LossScale.create(False),
        loss_state=loss.init_state() if hasattr(loss, "init_state") else {},
    )
    # As the step holds it: kernels OHWI, BatchNorm statistics per device.
    state = device_state(state, mesh.size)
    state = state.replace(
        params={**state.params, "head": {"centres": jax.device_put(centres, class_sharding(mesh))}}
    )
    step = jax.jit(make_train_step(model, tx, schedule, loss, cfg.num_classes, mesh))
    sharding = batch_sharding(mesh)
    args = (state, jax.device_put(batch, sharding), jax.device_put(labels, sharding))
    # The -O0 above changes float32 reduction order enough to move the first layers'
    # gradients by ~1e-3 relative (measured against a float64 torch run), so this step is
    # compiled at the default level.
    with jax.default_matmul_precision("highest"):
        compiled = step.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 2})
    new, metrics = compiled(*args)
    return jax.device_get(saved_state(new)), float(metrics["loss"])
