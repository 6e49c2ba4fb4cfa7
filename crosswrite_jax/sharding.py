"""Device mesh over (data, fsdp, tensor) and the logical-axis rules that map onto it."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from crosswrite_jax.config import SCANNED_LAYERS
from crosswrite_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by the models:
#   batch, length (activations); vocab, embed, heads, kv_heads, kv, mlp (parameters, sharded by presets);
#   norm, relative_buckets, length_table, types (small parameters, always replicated);
#   layers (model.scan_layers' leading axis of stacked parameters: never sharded, so each scan step reads its layer
#   without collectives, and the other axes shard as in an unrolled model).
_BATCH = ("batch", ("data", "fsdp"))
_LAYERS = (SCANNED_LAYERS, None)
RULES_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "data_parallel": (_BATCH, _LAYERS),
    "fsdp": (_BATCH, _LAYERS, ("embed", "fsdp")),
    "tensor_parallel": (_BATCH, _LAYERS, ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                        ("mlp", "tensor")),
    "fsdp_tp": (_BATCH, _LAYERS, ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
                ("mlp", "tensor")),
}


def logical_rules(preset: str) -> tuple[tuple[str, Any], ...]:
    """The logical -> mesh axis table of a named preset."""
    if preset not in RULES_PRESETS:
        raise UserError(f"config key 'mesh.rules' is '{preset}'; choose one of {', '.join(RULES_PRESETS)}")
    return RULES_PRESETS[preset]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, key: str = "mesh.shape",
                       unit: str = "devices") -> tuple[int, ...]:
    """Fills a -1 entry with the remaining devices (or slices); checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise UserError(f"config key '{key}' {shape}: needs {len(MESH_AXES)} positive sizes "
                        f"({', '.join(MESH_AXES)}), one of which may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(f"config key '{key}' {shape}: {num_devices} {unit} do not divide by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"config key '{key}' {shape} needs {math.prod(shape)} {unit} but {num_devices} are present;"
            f" set one size to -1 to take the remaining {unit}")
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes, as Linen sharding needs.

    With a `dcn_shape` whose product is above 1 the mesh is hybrid: `shape` is the mesh inside each slice (ICI),
    `dcn_shape` lays the slices out along the same axes (data center network); each axis is then
    shape[i] * dcn_shape[i] long. Devices without a slice index (CPU, GPU) count each process as a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if dcn_shape is not None and math.prod(abs(int(s)) for s in dcn_shape) != 1:
        return Mesh(hybrid_device_array(shape, dcn_shape, devices), MESH_AXES, axis_types=axis_types)
    shape = resolve_mesh_shape(shape, len(devices))
    if devices[0].platform == "tpu":  # also the compile-only devices of a topology: laid out along the torus
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def slice_groups(devices: Sequence[Any]) -> tuple[str, dict[int, list[Any]]]:
    """('slice_index' or 'process_index', granule -> its devices): what the DCN mesh axes connect."""
    attr = "slice_index" if getattr(devices[0], "slice_index", None) is not None else "process_index"
    groups: dict[int, list[Any]] = {}
    for device in devices:
        groups.setdefault(int(getattr(device, attr)), []).append(device)
    return attr, groups


def hybrid_device_array(shape: Sequence[int], dcn_shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """The device grid of a multi-slice mesh: `shape` within each slice times `dcn_shape` across slices."""
    attr, groups = slice_groups(devices)
    unit = "slices" if attr == "slice_index" else "processes (devices without slices: a process is one)"
    dcn = resolve_mesh_shape(dcn_shape, len(groups), key="mesh.dcn_shape", unit=unit)
    sizes = {len(group) for group in groups.values()}
    if len(sizes) != 1:
        raise UserError(f"config key 'mesh.dcn_shape' {tuple(dcn_shape)}: the {len(groups)} {attr} groups hold "
                        f"unequal device counts {sorted(sizes)}; every slice needs the same number")
    ici = resolve_mesh_shape(shape, sizes.pop(), unit="devices per slice")
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=attr == "process_index",
                                                    allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as error:
        raise UserError(f"config keys 'mesh.shape' {ici} x 'mesh.dcn_shape' {dcn}: no device mesh of that "
                        f"layout on these devices ({error})") from None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded over (data, fsdp)."""
    spec = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(spec, v) for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding."""
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
