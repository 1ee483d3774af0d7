"""The 1-D device mesh and the shardings the trainer uses on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


class MeshError(ValueError):
    """The mesh the config asks for cannot be built on this machine."""


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all devices, or the first `num_devices`."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise MeshError(
                f"config key 'num_devices'={num_devices}, but only {len(devices)} "
                f"{devices[0].platform} device(s) are available"
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[k micro-batches, batch, ...]: the batch axis split over the devices."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def class_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (classes) of the centre matrix split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
