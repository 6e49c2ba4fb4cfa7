"""TrainState and the one sharded layout of a model on a mesh: eval_shape -> logical specs -> NamedShardings for
parameters and optimizer state -> jit(init, out_shardings). Training, evaluation, prediction, PEFT, Hugging Face
export, bench, compile checks and the golden sharding tests all take their layout from `build_layout`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crosswrite_jax import peft, sharding
from crosswrite_jax.config import Config
from crosswrite_jax.models.transformer import build_model, example_inputs
from crosswrite_jax.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclass(frozen=True)
class StateLayout:
    """Shapes and shardings of a model's TrainState on a mesh, known before anything is allocated, and the model,
    optimizer and initializer they were derived from."""

    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings
    param_logical_specs: Any  # PartitionSpecs over logical axis names
    mesh: Mesh
    rules: Any  # logical axis name -> mesh axes
    model: nn.Module
    tx: optax.GradientTransformation
    labels: Any  # 'train' / 'freeze' per parameter
    init_params: Callable[[jax.Array], Any]  # key -> (boxed) parameters

    def abstract_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs carrying their target sharding, as Orbax restore wants them."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh and logical rules in force while tracing."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def create_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state, created in their shards."""
        with self.context():
            return create_state(self.init_params, self.tx, self, jax.random.key(seed))


def build_layout(config: Config, mesh: Mesh) -> StateLayout:
    """The model of `config.model`, its optimizer (labels from optimizer.freeze and peft.*) and the shapes and
    shardings of their state on `mesh` under `config.mesh.rules`, from abstract evaluation alone."""
    rules = sharding.logical_rules(config.mesh.rules)
    model = build_model(config.model)
    dummy = example_inputs(config.model)
    init = lambda key: model.init({"params": key}, *dummy)["params"]  # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: init(jax.random.key(0)))  # traced key: the mesh may be compile-only
        rule = peft.trainable_rule(config)
        param_shapes = strip_boxes(boxed)
        peft.check_trainable(config, list(traverse_util.flatten_dict(param_shapes, sep="/")), rule)
        tx, labels = make_optimizer(config.optimizer, param_shapes, config.train.steps, rule)
        logical_specs = nn.get_partition_spec(boxed)
        param_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
        opt_shapes = jax.eval_shape(tx.init, param_shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=param_shapes, opt_state=opt_shapes)
    shardings = TrainState(step=replicated, params=param_shardings,
                           opt_state=optimizer_state_shardings(opt_shapes, param_shapes, param_shardings,
                                                                replicated))
    return StateLayout(abstract, shardings, logical_specs, mesh, rules, model, tx, labels, init)


def optimizer_state_shardings(opt_shapes: Any, param_shapes: Any, param_shardings: Any,
                              replicated: NamedSharding) -> Any:
    """Every optimizer-state subtree laid out like the parameters (Adam's moments, Adafactor's statistics) takes,
    leaf by leaf, its parameter's sharding where the shapes agree; everything else is replicated: step counts, and
    Adafactor's factored row and column statistics (a vector per matrix). Frozen parameters hold no state (their
    `MaskedNode`s stay as they are).

    (`optax.tree_map_params` finds the parameter-shaped subtrees by initializing with placeholders, which
    Adafactor cannot: it reads each parameter's shape to decide what to factor.)"""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    layout = jax.tree.structure(param_shapes)

    def place(node: Any) -> Any:
        if jax.tree.structure(node, is_leaf=masked) == layout:
            return jax.tree.map(lambda leaf, param, spec: leaf if masked(leaf) else
                                spec if leaf.shape == param.shape else replicated,
                                node, param_shapes, param_shardings, is_leaf=masked)
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if len(children) == 1 and children[0] is node:  # a leaf outside any parameter-shaped subtree
            return replicated
        return treedef.unflatten([place(child) for child in children])

    return place(opt_shapes)


def strip_boxes(boxed: Any) -> Any:
    """Removes logical-partitioning boxes without applying sharding constraints (for abstract trees)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def create_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, layout: StateLayout,
                 rng: jax.Array) -> TrainState:
    """Initializes the state directly into its shards; nothing is materialized whole on one device."""

    def init(key):
        params = nn.unbox(init_params(key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=layout.shardings)(rng)
