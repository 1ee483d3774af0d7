"""Tests run on CPU with 8 virtual devices, so sharding is exercised without a GPU."""

import os

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

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from jaxface.data.synthetic import SyntheticFaces, write_synthetic_bin  # noqa: E402
from jaxface.heads import gather_rows, partial_fc_loss, sample_class_ids  # noqa: E402

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


def head_loss(emb, labels, centres, *, margin, num_classes, mesh, num_sample=None, key=None):
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
    )
