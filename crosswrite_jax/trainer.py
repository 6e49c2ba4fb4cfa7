"""The train step (dropout keys from the step, gradient accumulation, non-finite guard) and `Trainer`: a run's
model, optimizer and sharded layout on a mesh with its jitted train and eval steps, which training, bench,
compile checks and tests build on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from crosswrite_jax import config as config_lib
from crosswrite_jax import sharding
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import jit_eval_step
from crosswrite_jax.losses import task_losses, zero_sums
from crosswrite_jax.optim import count_parameters, learning_rate_schedule, tree_bytes
from crosswrite_jax.state import StateLayout, TrainState, build_layout
from crosswrite_jax.tasks import Task, get_task


def microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """[B, ...] -> [count, B / count, ...]; microbatch k holds rows k, k + count, ... so that each keeps its
    share of every data-parallel shard (the scan over microbatches needs no communication)."""

    def split(x):
        rows = x.shape[0]
        x = jnp.swapaxes(x.reshape((rows // count, count) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float, dropout_seed: int, grad_accum_steps: int = 1,
                    logits_chunk_length: int = 0, dropout_rng: str = config_lib.TrainConfig.dropout_rng,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`; dropout keys derive from the step, so resume is exact.

    A step whose loss or gradients are not finite leaves params and optimizer state unchanged
    (metrics['nonfinite'] is 1); the step counter still advances past its batch. With `grad_accum_steps` > 1
    the batch runs as that many microbatches in a `lax.scan` (activations of one microbatch live at a time):
    summed token losses and gradients, divided by the batch's token count, equal the full batch's.
    """

    def summed_loss(params, batch, rng):
        sums = task_losses(model, task, {"params": params}, batch, False, {"dropout": rng}, label_smoothing,
                           logits_chunk_length)
        return sums["loss_sum"], sums

    def accumulated_grads(params, batch, rng):
        def body(carry, micro):
            index, micro_batch = micro
            grads, sums = jax.grad(summed_loss, has_aux=True)(params, micro_batch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums()),
                                        (jnp.arange(grad_accum_steps), microbatches(batch, grad_accum_steps)))
        scale = 1.0 / jnp.maximum(sums["tokens"], 1.0)
        return jax.tree.map(lambda g: g * scale, grads), sums

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(dropout_seed, impl=dropout_rng), state.step)

        def loss_fn(params):
            loss_sum, sums = summed_loss(params, batch, rng)
            return loss_sum / jnp.maximum(sums["tokens"], 1.0), sums

        if grad_accum_steps > 1:
            grads, sums = accumulated_grads(state.params, batch, rng)
        else:
            grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient must not touch the state: keep parameters and moments as they were.
        finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = dict(sums, grad_norm=grad_norm, learning_rate=schedule(state.step),
                       nonfinite=1.0 - finite.astype(jnp.float32))
        return TrainState(step=state.step + 1, params=keep(params, state.params),
                          opt_state=keep(opt_state, state.opt_state)), metrics

    return train_step


@dataclass
class Trainer:
    """A model, its optimizer and their sharded layout on a mesh, with the run's task and learning-rate schedule."""

    config: Config
    task: Task
    layout: StateLayout
    schedule: optax.Schedule

    @classmethod
    def build(cls, config: Config, mesh: Mesh) -> "Trainer":
        platform = mesh.devices.flat[0].platform
        if config.model.attention_kernel == "cudnn" and platform != "gpu":
            raise UserError(f"config key 'model.attention_kernel' is 'cudnn', a GPU kernel, but this run's devices "
                            f"are {platform}; set --config.model.attention_kernel=xla")
        task = get_task(config.task)
        task.check_config(config)
        return cls(config, task, build_layout(config, mesh),
                   learning_rate_schedule(config.optimizer, config.train.steps))

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh

    @property
    def rules(self) -> Any:
        return self.layout.rules

    @property
    def model(self) -> nn.Module:
        return self.layout.model

    @property
    def tx(self) -> optax.GradientTransformation:
        return self.layout.tx

    def context(self):
        """Mesh and logical rules in force while tracing."""
        return self.layout.context()

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created in their shards."""
        return self.layout.create_state(self.config.train.seed)

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 state around given (sharded) parameters, with fresh optimizer moments."""

        def fresh(p):
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p))

        with self.context():
            return jax.jit(fresh, in_shardings=(self.layout.shardings.params,), out_shardings=self.layout.shardings)(
                params)

    def jit_train_step(self):
        step = make_train_step(self.model, self.task, self.tx, self.schedule, self.config.train.label_smoothing,
                               self.config.train.seed + 1, self.config.train.grad_accum_steps,
                               self.config.train.logits_chunk_length, self.config.train.dropout_rng)
        batch = sharding.batch_sharding(self.mesh)
        return jax.jit(step, in_shardings=(self.layout.shardings, batch),
                       out_shardings=(self.layout.shardings, sharding.replicated(self.mesh)), donate_argnums=0)

    def jit_eval_step(self):
        return jit_eval_step(self.model, self.task, self.config.train.label_smoothing,
                             self.config.train.logits_chunk_length, self.layout.shardings.params, self.mesh)

    def parameter_report(self) -> dict[str, int]:
        """Trainable / frozen counts and optimizer-state bytes, from shapes alone."""
        counts = count_parameters(self.layout.abstract.params, self.layout.labels)
        return dict(counts, optimizer_state_bytes=tree_bytes(self.layout.abstract.opt_state))
