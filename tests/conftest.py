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

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def small_val_bin(tmp_path) -> Path:
    """A 40-pair synthetic verification set for the tests' 12-class demo runs (seed 2048)."""
    from jaxface.data.synthetic import SyntheticFaces, SyntheticStream, write_synthetic_bin

    path = tmp_path / "small_val.bin"
    write_synthetic_bin(path, SyntheticStream(SyntheticFaces(12, seed=2048), 4000, 32, 2048), 40)
    return path
