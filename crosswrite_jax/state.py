"""TrainState and its sharded creation: eval_shape -> logical specs -> jit(init, out_shardings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crosswrite_jax.optim import path_str


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclass(frozen=True)
class StateLayout:
    """Shapes and shardings of a TrainState, known before anything is allocated."""

    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings
    param_logical_specs: Any  # PartitionSpecs over logical axis names

    def abstract_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs carrying their target sharding, as Orbax restore wants them."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)


def optimizer_state_shardings(opt_shapes: Any, param_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Gives each optimizer-state leaf its parameter's sharding (matched by path suffix and shape)."""
    by_path = {}
    for (path, shape), sharding in zip(jax.tree_util.tree_flatten_with_path(param_shapes)[0],
                                       jax.tree.leaves(param_shardings)):
        by_path[path_str(path)] = (shape.shape, sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def match(path, leaf):
        name = path_str(path)
        for param_path, (shape, sharding) in by_path.items():
            if (name == param_path or name.endswith("/" + param_path)) and leaf.shape == shape:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(match, opt_shapes)


def strip_boxes(boxed: Any) -> Any:
    """Removes logical-partitioning boxes without applying sharding constraints (for abstract trees)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_layout(boxed: Any, tx: optax.GradientTransformation, mesh: Mesh, rules) -> StateLayout:
    """Works out every leaf's shape and sharding from abstract parameters alone."""
    logical_specs = nn.get_partition_spec(boxed)
    param_shapes = strip_boxes(boxed)
    param_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, param_shapes)
    opt_shardings = optimizer_state_shardings(opt_shapes, param_shapes, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=param_shapes, opt_state=opt_shapes)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    return StateLayout(abstract, shardings, logical_specs)


def create_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, layout: StateLayout,
                 rng: jax.Array) -> TrainState:
    """Initializes the state directly into its shards; nothing is materialized whole on one device."""

    def init(key):
        params = nn.unbox(init_params(key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=layout.shardings)(rng)
