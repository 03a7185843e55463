"""Data parallelism over the local devices: one mesh, batch axis split, parameters replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh() -> Mesh:
    """A 1-D mesh over every local device; the batch axis is split along ``"data"``."""
    return Mesh(np.array(jax.local_devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays ``(batch, ...)`` split over the devices along the batch axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state, the training volumes)."""
    return NamedSharding(mesh, PartitionSpec())
