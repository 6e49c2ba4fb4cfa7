"""Device mesh over (data, fsdp, tensor) and the logical-axis rules that map onto it."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from crosswrite_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by the models:
#   batch, length (activations); vocab, embed, heads, kv_heads, kv, mlp (parameters, sharded by presets);
#   norm, relative_buckets, length_table, types (small parameters, always replicated).
_BATCH = ("batch", ("data", "fsdp"))
RULES_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "data_parallel": (_BATCH,),
    "fsdp": (_BATCH, ("embed", "fsdp")),
    "tensor_parallel": (_BATCH, ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                        ("mlp", "tensor")),
    "fsdp_tp": (_BATCH, ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                ("mlp", "tensor")),
}


def logical_rules(preset: str) -> tuple[tuple[str, Any], ...]:
    """The logical -> mesh axis table of a named preset."""
    if preset not in RULES_PRESETS:
        raise UserError(f"config key 'mesh.rules' is '{preset}'; choose one of {', '.join(RULES_PRESETS)}")
    return RULES_PRESETS[preset]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a -1 entry with the remaining devices; checks the product."""
    shape = tuple(int(s) for s in shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(f"config key 'mesh.shape' {shape}: {num_devices} devices do not divide by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"config key 'mesh.shape' {shape} needs {math.prod(shape)} devices but {num_devices} are present;"
            " set one size to -1 to take the remaining devices")
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes, as Linen sharding needs."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding."""
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
