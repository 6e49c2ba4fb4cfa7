"""The training loop: a jitted, sharded train_step fed by the grain pipeline, with validation and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from crosswrite_jax import checkpoint, peft, sharding
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax import config as config_lib
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.data import labeled, pipeline, pretraining
from crosswrite_jax.models.transformer import LAYER_STACKS, PAD_ID, build_model, example_inputs
from crosswrite_jax.tasks import Task, get_task, labeling
from crosswrite_jax.preflight import check_params
from crosswrite_jax.profiling import StepProfiler
from crosswrite_jax.optim import count_parameters, learning_rate_schedule, make_optimizer, tree_bytes
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.state import StateLayout, TrainState, create_state, state_layout, strip_boxes

log = logging.getLogger("crosswrite")


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 label_smoothing: float) -> dict[str, jax.Array]:
    """Summed (label-smoothed) loss, NLL, correct tokens and token count over the weighted targets.

    Written without a one-hot target matrix or an argmax (each a full [..., V] pass that XLA:CPU runs slowly):
    the smoothed loss is (1 - e) NLL + (e / V) (V logsumexp - sum of logits), and a token is correct when no
    logit beats the target's (nor equals it at a lower id: argmax's first-index rule).
    """
    vocab = logits.shape[-1]
    on, off = 1.0 - label_smoothing, label_smoothing / vocab
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    logsumexp = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    is_target = ids == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    nll = logsumexp - target_logit
    loss = on * nll + off * (vocab * logsumexp - jnp.sum(logits, axis=-1)) if label_smoothing else nll
    threshold = target_logit[..., None]
    beaten = (logits > threshold) | ((logits == threshold) & (ids < targets[..., None]))
    correct = jnp.logical_not(jnp.any(beaten, axis=-1)).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


def _zero_sums() -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "nll_sum", "correct", "tokens")}


def chunked_token_losses(project: Callable[[Any, jax.Array], jax.Array], params: Any, hidden: jax.Array,
                         targets: jax.Array, weights: jax.Array, label_smoothing: float,
                         chunk_length: int) -> dict[str, jax.Array]:
    """`token_losses` of `project(params, hidden)` computed `chunk_length` positions at a time.

    A scan over position chunks that holds one chunk's [B, chunk, V] logits at a time, never the whole
    [B, T, V]. Under differentiation the same scan also takes each chunk's gradients with respect to the head's
    parameters and to `hidden` as it goes (a custom VJP whose backward pass only scales them), so the output
    projection runs once forward and once backward, as without chunks, instead of being recomputed. Sums and
    gradients equal the unchunked ones up to float rounding. Only `loss_sum` is differentiable (it is what
    training minimises); the other sums are metrics. The layer stacks' parameters are not the head's:
    `project` must not use them.
    """
    rows, length = targets.shape
    count = -(-length // chunk_length)
    pad = count * chunk_length - length
    head = {k: v for k, v in params.items() if k not in LAYER_STACKS}
    stacks = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k in LAYER_STACKS}

    def chunks(x):  # [B, T, ...] -> [count, B, chunk, ...]; padded positions carry zero weight
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((rows, count, chunk_length) + x.shape[2:]), 0, 1)

    def sweep(head, hidden, gradients: bool):
        def chunk_loss(head, h, t, w):
            sums = token_losses(project({**stacks, **head}, h), t, w, label_smoothing)
            return sums["loss_sum"], sums

        def body(carry, chunk):
            totals, head_grads = carry
            if not gradients:
                return (jax.tree.map(jnp.add, totals, chunk_loss(head, *chunk)[1]), None), None
            _, vjp, sums = jax.vjp(lambda p, h: chunk_loss(p, h, *chunk[1:]), head, chunk[0], has_aux=True)
            grads, hidden_grad = vjp(jnp.ones((), jnp.float32))
            return (jax.tree.map(jnp.add, totals, sums), jax.tree.map(jnp.add, head_grads, grads)), hidden_grad

        init = (_zero_sums(), jax.tree.map(jnp.zeros_like, head) if gradients else None)
        (totals, head_grads), hidden_grads = jax.lax.scan(body, init, (chunks(hidden), chunks(targets),
                                                                       chunks(weights)))
        return totals, head_grads, hidden_grads

    @jax.custom_vjp
    def losses(head, hidden):
        return sweep(head, hidden, gradients=False)[0]

    def forward(head, hidden):
        totals, head_grads, hidden_grads = sweep(head, hidden, gradients=True)
        hidden_grads = jnp.swapaxes(hidden_grads, 0, 1).reshape((rows, count * chunk_length) + hidden.shape[2:])
        return totals, (head_grads, hidden_grads[:, :length])

    def backward(residuals, cotangents):
        head_grads, hidden_grad = residuals
        scale = cotangents["loss_sum"]
        return (jax.tree.map(lambda g: (scale * g).astype(g.dtype), head_grads),
                (scale * hidden_grad).astype(hidden_grad.dtype))

    losses.defvjp(forward, backward)
    return losses(head, hidden)


def task_losses(model: nn.Module, task: Task, variables: Any, batch: dict[str, jax.Array], deterministic: bool,
                rngs: dict, label_smoothing: float, logits_chunk_length: int = 0) -> dict[str, jax.Array]:
    """Summed token losses of one batch under the task's forward pass, chunked over positions if asked."""
    if logits_chunk_length and task.vocabulary_outputs:
        hidden, targets, weights = task.forward(model, variables, batch, deterministic, rngs, return_hidden=True)
        project = lambda params, h: model.apply({**variables, "params": params}, h, method="logits")  # noqa: E731
        return chunked_token_losses(project, variables["params"], hidden, targets, weights, label_smoothing,
                                    logits_chunk_length)
    logits, targets, weights = task.forward(model, variables, batch, deterministic, rngs)
    return token_losses(logits, targets, weights, label_smoothing)


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
        (grads, sums), _ = jax.lax.scan(body, (zeros, _zero_sums()),
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


def make_eval_step(model: nn.Module, task: Task, label_smoothing: float, predictions: bool = False,
                   logits_chunk_length: int = 0) -> Callable[[Any, dict], dict]:
    """`eval_step(params, batch) -> summed losses`, teacher-forced, no dropout; with `predictions`, also the
    argmax label ids of the same forward pass (classification, tagging) under 'predictions'."""

    def eval_step(params, batch):
        if not predictions:
            return task_losses(model, task, {"params": params}, batch, True, {}, label_smoothing, logits_chunk_length)
        logits, targets, weights = task.forward(model, {"params": params}, batch, True, {})
        sums = token_losses(logits, targets, weights, label_smoothing)
        if predictions:
            sums["predictions"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sums

    return eval_step


def jit_labeled_eval_step(model: nn.Module, task: Task, label_smoothing: float, param_shardings, mesh: Mesh):
    """The jitted losses-and-predictions step of classification / tagging, sharded like training."""
    batch = sharding.batch_sharding(mesh)
    sums = {k: sharding.replicated(mesh) for k in ("loss_sum", "nll_sum", "correct", "tokens")}
    return jax.jit(make_eval_step(model, task, label_smoothing, predictions=True),
                   in_shardings=(param_shardings, batch), out_shardings=dict(sums, predictions=batch))


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Per-token loss, NLL, perplexity and accuracy from summed metrics."""
    tokens = max(sums["tokens"], 1.0)
    nll = sums["nll_sum"] / tokens
    return {"loss": sums["loss_sum"] / tokens, "nll": nll, "perplexity": float(np.exp(min(nll, 50.0))),
            "accuracy": sums["correct"] / tokens, "tokens": sums["tokens"]}


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded over (data, fsdp)."""
    spec = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(spec, v) for k, v in local_batch.items()}


@dataclass
class Trainer:
    """A model, its optimizer and their sharded layout on a mesh: what both training and tests build on."""

    config: Config
    mesh: Mesh
    rules: Any
    task: Task
    model: nn.Module
    tx: optax.GradientTransformation
    labels: Any
    layout: StateLayout
    schedule: optax.Schedule
    init_params: Callable[[jax.Array], Any]

    @classmethod
    def build(cls, config: Config, mesh: Mesh) -> "Trainer":
        platform = mesh.devices.flat[0].platform
        if config.model.attention_kernel == "cudnn" and platform != "gpu":
            raise UserError(f"config key 'model.attention_kernel' is 'cudnn', a GPU kernel, but this run's devices "
                            f"are {platform}; set --config.model.attention_kernel=xla")
        rules = sharding.logical_rules(config.mesh.rules)
        task = get_task(config.task)
        model = build_model(config.model)
        dummy = example_inputs(config.model)
        init = lambda key: model.init({"params": key}, *dummy)["params"]  # noqa: E731
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda: init(jax.random.key(0)))  # traced key: the mesh may be compile-only
            rule = peft.trainable_rule(config)
            peft.check_trainable(config, list(_flat_paths(boxed)), rule)
            tx, labels = make_optimizer(config.optimizer, strip_boxes(boxed), config.train.steps, rule)
            layout = state_layout(boxed, tx, mesh, rules)
        return cls(config, mesh, rules, task, model, tx, labels, layout,
                   learning_rate_schedule(config.optimizer, config.train.steps), init)

    @contextlib.contextmanager
    def context(self):
        """Mesh and logical rules in force while tracing."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created in their shards."""
        with self.context():
            return create_state(self.init_params, self.tx, self.layout, jax.random.key(self.config.train.seed))

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
        step = make_eval_step(self.model, self.task, self.config.train.label_smoothing,
                              logits_chunk_length=self.config.train.logits_chunk_length)
        return jax.jit(step, in_shardings=(self.layout.shardings.params, sharding.batch_sharding(self.mesh)),
                       out_shardings=sharding.replicated(self.mesh))

    def parameter_report(self) -> dict[str, int]:
        """Trainable / frozen counts and optimizer-state bytes, from shapes alone."""
        counts = count_parameters(self.layout.abstract.params, self.labels)
        return dict(counts, optimizer_state_bytes=tree_bytes(self.layout.abstract.opt_state))


def _flat_paths(boxed: Any) -> list[str]:
    from flax import traverse_util

    return list(traverse_util.flatten_dict(strip_boxes(boxed), sep="/"))


def params_from(path: str, trainer: Trainer, tokenizer) -> Any:
    """Parameters of another run's checkpoint, checked against this model and placed in its shards.

    Parameters matching a `train.init_exclude` pattern start from fresh initialisation, and so do those the
    checkpoint lacks that are task heads or PEFT additions (a classifier on a pretrained encoder, LoRA
    adapters, a soft prompt); both are logged, with the checkpoint entries left unused.
    """
    exclude = trainer.config.train.init_exclude
    abstract = trainer.layout.abstract_with_shardings().params
    fresh_if_missing = f"{peft.HEADS[trainer.config.model.family]}|{peft.ADDED}"
    if workdir_lib.is_hf_model_directory(path):
        return _params_from_hf(Path(path), trainer, exclude, fresh_if_missing)
    _, checkpoint_dir, step = workdir_lib.locate_checkpoint(path)
    manager = checkpoint.open_manager(checkpoint_dir, read_only=True)
    try:
        newest = step if step is not None else manager.latest_step()
        if newest is None:
            raise UserError(f"train.init_from '{path}' holds no checkpoint; train it first")
        target, fresh_paths, unused = _partial_target(checkpoint_dir / str(newest), abstract, exclude,
                                                      fresh_if_missing)
        if not fresh_paths and not unused:
            check_params(checkpoint_dir / str(newest), trainer.layout.abstract.params)
            params, metadata, _ = checkpoint.restore_params(manager, abstract, step)
        else:
            loaded, metadata, _ = checkpoint.restore_params(manager, target, newest, strict=False)
            params = _merge_fresh(trainer, loaded)
            if jax.process_index() == 0:
                log.info("init_from %s: %d parameter arrays loaded, %d freshly initialised (%s), %d checkpoint "
                         "arrays not used (%s)", path, len(jax.tree.leaves(loaded)), len(fresh_paths),
                         ", ".join(fresh_paths) or "none", len(unused), ", ".join(unused) or "none")
    finally:
        manager.close()
    workdir_lib.check_tokenizer(metadata, tokenizer, checkpoint_dir)
    return params


def _params_from_hf(directory: Path, trainer: Trainer, exclude: tuple[str, ...], fresh_if_missing: str) -> Any:
    """Parameters converted from a Hugging Face model directory, the rest (heads, adapters) freshly initialised."""
    import re

    from flax import traverse_util

    from crosswrite_jax.models import hf
    from crosswrite_jax.models.transformer import param_shapes

    hf_config, tensors = hf.read_checkpoint(directory)
    kind, model_config = hf.config_from_hf(hf_config, tensors)
    loaded = traverse_util.flatten_dict(hf.params_from_hf(kind, model_config, tensors, param_shapes(model_config)),
                                        sep="/")
    abstract = traverse_util.flatten_dict(trainer.layout.abstract_with_shardings().params, sep="/")
    fresh = traverse_util.flatten_dict(trainer.init_state().params, sep="/")
    params, fresh_paths = {}, []
    for name, target in abstract.items():
        if any(re.fullmatch(p, name) for p in exclude) or (name not in loaded and re.fullmatch(fresh_if_missing, name)):
            params[name] = fresh[name]
            fresh_paths.append(name)
        elif name not in loaded:
            raise UserError(f"train.init_from '{directory}': parameter {name} is not in this {kind} checkpoint; add a "
                            f"pattern for it to train.init_exclude to initialise it fresh")
        elif tuple(loaded[name].shape) != tuple(target.shape):
            raise UserError(f"train.init_from '{directory}': {name} is {list(loaded[name].shape)} there but "
                            f"{list(target.shape)} in this model; make the model config match the checkpoint's "
                            f"config.json")
        else:
            params[name] = jax.device_put(loaded[name].astype(target.dtype), target.sharding)
    unused = sorted(set(loaded) - set(params))
    if jax.process_index() == 0:
        log.info("init_from %s (%s): %d parameter arrays loaded, %d freshly initialised (%s), %d not used (%s)",
                 directory, kind, len(params) - len(fresh_paths), len(fresh_paths), ", ".join(fresh_paths) or "none",
                 len(unused), ", ".join(unused) or "none")
    return traverse_util.unflatten_dict(params, sep="/")


def _partial_target(step_dir: Path, abstract: Any, exclude: tuple[str, ...],
                    fresh_if_missing: str = "$^") -> tuple[Any, list[str], list[str]]:
    """(restore target without the fresh parameters, fresh parameter paths, unused checkpoint paths)."""
    import re

    from flax import traverse_util

    from crosswrite_jax.preflight import saved_param_shapes

    try:
        patterns = [re.compile(p) for p in exclude]
    except re.error as error:
        raise UserError(f"config key 'train.init_exclude': {error}; write Python regular expressions") from None
    saved = saved_param_shapes(step_dir / "params")
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(abstract).items()}
    excluded = {name for name in flat if any(p.fullmatch(name) for p in patterns)}
    excluded |= {name for name in flat if name not in saved and re.fullmatch(fresh_if_missing, name)}
    for pattern in patterns:
        if not any(pattern.fullmatch(name) for name in flat):
            raise UserError(f"config key 'train.init_exclude': pattern '{pattern.pattern}' matches no parameter of "
                            f"the model (e.g. {next(iter(flat))}); fix or drop it")
    missing = sorted(n for n in flat if n not in saved and n not in excluded)
    if missing:
        raise UserError(f"{step_dir}: {len(missing)} model parameters are not in the checkpoint (first: "
                        f"{missing[0]}); add patterns for them to train.init_exclude to initialise them fresh")
    for name in sorted(set(flat) - excluded):
        have, want = saved[name][0], tuple(flat[name].shape)
        if have != want:
            raise UserError(f"{step_dir}: parameter {name} is {list(have)} in the checkpoint but {list(want)} in "
                            f"the model; add it to train.init_exclude or use the model config that trained it")
    keep = {tuple(k.split("/")): v for k, v in flat.items() if k not in excluded}
    unused = sorted(n for n in saved if n not in flat or n in excluded)
    return traverse_util.unflatten_dict(keep), sorted(excluded), unused


def _merge_fresh(trainer: Trainer, loaded: Any) -> Any:
    """The loaded parameters with the fresh paths taken from this run's own initialisation."""
    from flax import traverse_util

    merged = traverse_util.flatten_dict(trainer.init_state().params)
    merged.update(traverse_util.flatten_dict(loaded))
    return traverse_util.unflatten_dict(merged)


def _validate(trainer: Trainer, eval_step, params, val_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    with trainer.context():
        for batch in val_batches:
            sums = jax.device_get(eval_step(params, to_global_batch(batch, trainer.mesh)))
            for k in totals:
                totals[k] += float(sums[k])
    return summarize(totals)


def make_dataset(pairs, tokenizer, config: Config, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """The random-access grain dataset of translation batches (packed or bucketed, as configured)."""
    d = config.data
    common = dict(global_batch_size=config.train.batch_size, seed=seed, process_index=jax.process_index(),
                  process_count=jax.process_count())
    if d.packing:
        return pipeline.packed_train_dataset(pairs, tokenizer, source_length=d.max_source_length,
                                             target_length=d.max_target_length, **common)
    return pipeline.train_dataset(pairs, tokenizer, max_source_length=d.max_source_length,
                                  max_target_length=d.max_target_length, bucket_lengths=d.bucket_lengths,
                                  length_grouping_window=d.length_grouping_window if shuffle else 1, **common)


def training_batches(run: workdir_lib.Run, trainer: Trainer) -> grain.IterDataset:
    """This process's training batches for the run's task, as a resumable grain dataset."""
    config = run.config
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    if trainer.task.labeled:
        d = config.data
        data = labeled.train_dataset(
            config.task, run.read_examples(d.train_split, d.max_train_examples), run.tokenizer, d.labels,
            global_batch_size=config.train.batch_size, max_length=d.max_source_length,
            bucket_lengths=d.bucket_lengths, seed=config.train.seed, length_grouping_window=d.length_grouping_window,
            process_index=jax.process_index(), process_count=jax.process_count())
        return data.to_iter_dataset(options)
    if not trainer.task.pretraining:
        data = make_dataset(run.read_split(config.data.train_split, config.data.max_train_examples), run.tokenizer,
                            config, config.train.seed)
        return data.to_iter_dataset(options)
    return _pretraining_dataset(run, config.data.sources, config.train.seed, shuffle=True)


@dataclass
class LabeledSplit:
    """A classification / tagging split to score: its examples and their in-order batches (same on every process)."""

    examples: list
    batches: list[dict[str, np.ndarray]]

    @classmethod
    def read(cls, run: workdir_lib.Run, split: str, batch_size: int, max_examples: int = 0) -> "LabeledSplit":
        d = run.config.data
        examples = run.read_examples(split, max_examples)
        batches = labeled.eval_batches(run.config.task, examples, run.tokenizer, d.labels, batch_size=batch_size,
                                       max_length=d.max_source_length, bucket_lengths=d.bucket_lengths)
        return cls(examples, batches)


MODEL_KEYS = ("inputs", "labels", "tags")


def score_labeled(split: LabeledSplit, task: Task, labels: tuple[str, ...], mesh: Mesh, eval_step,
                  params) -> tuple[dict[str, Any], list]:
    """(loss and task scores over the whole split, predicted label or tags per example)."""
    from jax.experimental import multihost_utils

    totals = {"loss_sum": 0.0, "nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    predictions = []
    spec = sharding.batch_sharding(mesh)
    for batch in split.batches:
        arrays = {k: jax.make_array_from_callback(v.shape, spec, lambda index, v=v: v[index])
                  for k, v in batch.items() if k in MODEL_KEYS}
        out = eval_step(params, arrays)
        for k in totals:
            totals[k] += float(jax.device_get(out[k]))
        predictions.append(np.asarray(multihost_utils.process_allgather(out["predictions"], tiled=True)))
    predicted = labeling.predicted_labels(task.name, split.batches, predictions, split.examples, labels)
    scores = labeling.scores(task.name, predicted, split.examples)
    return dict(summarize(totals), **scores), predicted


def with_labels(config: Config, workdir: str | Path) -> Config:
    """A classification / tagging config with data.labels filled in (from the training split when empty)."""
    if not get_task(config.task).labeled:
        return config
    labels = config.data.labels
    if not labels:
        examples = workdir_lib.Run(Path(workdir), config, None).read_examples(config.data.train_split)
        labels = labeled.label_vocabulary(config.task, examples)
    if len(labels) != config.model.num_labels:
        shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
        raise UserError(f"the {config.task} data has {len(labels)} labels ({shown}) but config key 'model.num_labels' "
                        f"is {config.model.num_labels}; set --config.model.num_labels={len(labels)}")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, labels=tuple(labels)))


def validation_batches(run: workdir_lib.Run, task: Task, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """The fixed held-out batches of validation: `limit` (default train.eval_batches; 0: all, pretraining)."""
    config = run.config
    limit = config.train.eval_batches if limit is None else limit
    if not task.pretraining:
        data = make_dataset(run.read_split(config.data.eval_split), run.tokenizer, config, seed=0, shuffle=False)
        return [data[i] for i in range(limit)]
    if not config.data.eval_sources:
        raise UserError("config key 'data.eval_sources' is empty, but train.eval_every > 0 asks for validation; "
                        "name held-out text there or set --config.train.eval_every=0")
    batches = list(itertools.islice(_pretraining_dataset(run, config.data.eval_sources, 0, shuffle=False),
                                    limit or None))
    return _same_count_on_every_process(batches)


def _pretraining_dataset(run: workdir_lib.Run, specs: tuple[str, ...], seed: int, shuffle: bool) -> grain.IterDataset:
    config = run.config
    d = config.data
    return pretraining.pretraining_dataset(
        [run.documents(spec) for spec in specs], run.tokenizer, task=config.task, objective=config.objective,
        vocab_size=config.model.vocab_size, global_batch_size=config.train.batch_size,
        inputs_length=d.max_source_length, targets_length=d.max_target_length, seed=seed,
        weights=d.mixture_weights if shuffle else (), shuffle=shuffle, packing=d.packing,
        process_index=jax.process_index(), process_count=jax.process_count())


def _same_count_on_every_process(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Pads the list with empty batches so that every process runs the same number of eval steps."""
    if jax.process_count() == 1 or not batches:
        return batches
    from jax.experimental import multihost_utils

    most = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
    empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
    return batches + [empty] * (most - len(batches))


def train(config: Config, workdir: str | Path, stop_at: int | None = None) -> dict[str, Any]:
    """Trains (resuming from the newest checkpoint in `workdir`) and returns the last metrics.

    `stop_at` ends this invocation early at that step, with a checkpoint, as a preemption would.
    """
    started = time.perf_counter()
    config = with_labels(peft.resolve(config), workdir)
    run = workdir_lib.prepare(config, workdir)
    config, tokenizer = run.config, run.tokenizer
    mesh = sharding.make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
    ways = sharding.data_parallel_size(mesh)
    if config.train.batch_size % ways:
        raise UserError(f"config key 'train.batch_size' ({config.train.batch_size}) must be a multiple of the "
                        f"data-parallel size {ways} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % ways:
        raise UserError(f"config key 'train.grad_accum_steps' ({config.train.grad_accum_steps}) leaves microbatches "
                        f"of {micro} rows, not a multiple of the data-parallel size {ways}; lower it")
    config_lib.check_task_model(config, head_too=True)
    trainer = Trainer.build(config, mesh)
    is_main = jax.process_index() == 0
    report = trainer.parameter_report()
    if is_main:
        total = report["total"]
        log.info("mesh %s, rules %s", dict(mesh.shape), config.mesh.rules)
        log.info("parameters: %s trainable (%.1f%%), %s frozen; optimizer state %.2f MB",
                 f"{report['trainable']:,}", 100 * report["trainable"] / total, f"{report['frozen']:,}",
                 report["optimizer_state_bytes"] / 1e6)

    data_iterator = iter(training_batches(run, trainer))
    manager = checkpoint.open_manager(run.checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save)
    resumed: dict[str, Any] = {}
    if manager.latest_step() is not None:
        state, metadata = resumed = checkpoint.restore_state(
            manager, trainer.layout, data_iterator=data_iterator,
            preflight=lambda step_dir: check_params(step_dir, trainer.layout.abstract.params))
        workdir_lib.check_tokenizer(metadata, tokenizer, run.checkpoint_dir)
        if not metadata["data_restored"]:
            _skip_to(data_iterator, metadata.get("data_index", int(state.step)), trainer.task)
        if is_main:
            log.info("resumed from step %d", int(state.step))
    elif config.train.init_from:
        state = trainer.state_from_params(params_from(config.train.init_from, trainer, tokenizer))
        if is_main:
            log.info("started from the parameters of %s", config.train.init_from)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))

    validate = Validator(run, trainer) if config.train.eval_every > 0 else None
    best = _Best(config, run.workdir, resumed[1] if resumed else {})

    writer = MetricsWriter(run.workdir, enabled=is_main)
    train_step = trainer.jit_train_step()
    metadata = {"tokenizer_fingerprint": tokenizer.fingerprint, "data_index": start}
    last: dict[str, Any] = {}
    initial: dict[str, Any] = {}
    if validate and start == 0 and config.train.eval_at_start:
        val = validate(state.params)
        writer.write(0, "val", val)
        initial = {f"initial_val_{k}": v for k, v in val.items()}
    progress = _progress_bar(start, config, enabled=is_main and config.train.progress_bar)
    window = _Window()
    pending = None  # metrics of the step before, read after the next one is dispatched
    profiler = StepProfiler(run.workdir / "profile", start + 1, config.train.profile_steps, enabled=is_main)
    end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
    preemption = _Preemption(manager)
    try:
        with trainer.context():
            for step in range(start, end):
                local = next(data_iterator)
                profiler.before(step)
                state, metrics = train_step(state, to_global_batch(local, mesh))
                profiler.after(step, metrics)
                if pending is not None:
                    _account(window, *pending, config)
                pending = (step, metrics, _token_counts(local, trainer.task))
                done = step + 1
                if done % config.train.log_every == 0 or done == end:
                    _account(window, *pending, config)
                    pending = None
                    last = window.flush()
                    writer.write(done, "train", last)
                    progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_second']:.0f}",
                                         lr=f"{last['learning_rate']:.2e}", refresh=False)
                progress.update(1)
                stop_early = False
                if validate and (done % config.train.eval_every == 0 or done == config.train.steps):
                    val = validate(state.params)
                    writer.write(done, "val", val)
                    last.update({f"val_{k}": v for k, v in val.items()})
                    stop_early = best.update(done, val, state, dict(metadata, data_index=done))
                metadata.update(best.progress())
                if stop_early:
                    checkpoint.save(manager, state, dict(metadata, data_index=done), force=True,
                                    data_iterator=data_iterator)
                    log.info("early stopping at step %d: %s has not improved on %.4f (step %d) for %d validations",
                             done, config.train.best_metric, best.value, best.step, best.stale)
                    last["stopped_early_at"] = done
                    break
                if preemption.reached(done):
                    checkpoint.save(manager, state, dict(metadata, data_index=done), force=True,
                                    data_iterator=data_iterator)
                    log.warning("preempted: saved step %d; run the same command again to resume", done)
                    last["preempted_at"] = done
                    break
                in_nonfinite_streak = window.consecutive_nonfinite > 0  # no save while steps are being skipped
                if (done % config.checkpoint.every == 0 or done == end) and not in_nonfinite_streak:
                    checkpoint.save(manager, state, dict(metadata, data_index=done), force=True,
                                    data_iterator=data_iterator)
    finally:
        profiler.close()
        preemption.close()
        progress.close()
        checkpoint.finalize(manager)  # waits for the last async save, then writes its checksum manifest
        manager.close()
        best.close()
        summary = {"trainable_parameters": report["trainable"], "total_parameters": report["total"],
                   "trainable_percent": round(100 * report["trainable"] / report["total"], 3),
                   "optimizer_state_bytes": report["optimizer_state_bytes"], **best.summary(),
                   "seconds": round(time.perf_counter() - started, 1)}
        writer.write(int(jax.device_get(state.step)), "summary", summary)  # this invocation: wall time, sizes
        writer.close()
    return {**last, **initial, **summary}


class Validator:
    """Periodic validation: teacher-forced loss on held-out batches; classification and tagging also score the
    whole eval split (accuracy and macro-F1, or entity F1)."""

    def __init__(self, run: workdir_lib.Run, trainer: Trainer):
        self.run, self.trainer = run, trainer
        if trainer.task.labeled:
            config = run.config
            rows = -(-config.eval.batch_size // sharding.data_parallel_size(trainer.mesh)) * \
                sharding.data_parallel_size(trainer.mesh)
            self.split = LabeledSplit.read(run, config.data.eval_split, rows)
            self.eval_step = jit_labeled_eval_step(trainer.model, trainer.task, config.train.label_smoothing,
                                                   trainer.layout.shardings.params, trainer.mesh)
        else:
            self.eval_step = trainer.jit_eval_step()
            self.batches = validation_batches(run, trainer.task)
        self.decoded = run.config.train.eval_decode_examples if trainer.task.name in ("translation",
                                                                                       "summarization") else 0
        if self.decoded:
            from crosswrite_jax.evaluate import Restored

            self.restored = Restored(run, trainer.mesh, trainer.rules, trainer.model, trainer.layout.shardings.params,
                                     None, 0)
            self.decode = self.restored.decoder(run.config.eval.max_decode_length)

    def __call__(self, params) -> dict[str, Any]:
        if not self.trainer.task.labeled:
            scores = _validate(self.trainer, self.eval_step, params, self.batches)
            if self.decoded:  # greedy (or as decode.* say) outputs of the first examples, scored
                from crosswrite_jax.evaluate import generation_scores, translate_split

                self.restored.params = params
                hypotheses, references = translate_split(self.restored, self.run.config.data.eval_split,
                                                         self.decoded, self.decode)
                scores.update({k: v for k, v in generation_scores(self.trainer.task.name, hypotheses,
                                                                  references).items() if isinstance(v, (int, float))})
            return scores
        with self.trainer.context():
            scores, _ = score_labeled(self.split, self.trainer.task, self.run.config.data.labels, self.trainer.mesh,
                                      self.eval_step, params)
        return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


LOWER_IS_BETTER = ("loss", "nll", "perplexity")


class _Best:
    """Keeps the checkpoint with the best validation `train.best_metric` in WORKDIR/best; counts validations
    without improvement for early stopping. Its progress rides in every checkpoint's metadata, so resume keeps it."""

    def __init__(self, config: Config, workdir: Path, resumed: dict[str, Any]):
        self.metric, self.patience = config.train.best_metric, config.train.early_stopping_patience
        self.value, self.step = resumed.get("best_value"), resumed.get("best_step")
        self.stale = int(resumed.get("stale_validations", 0))
        self.manager = None
        if self.metric:
            self.manager = checkpoint.open_manager(Path(workdir) / workdir_lib.BEST, max_to_keep=1, async_save=False)

    def update(self, step: int, val: dict[str, Any], state: TrainState, metadata: dict[str, Any]) -> bool:
        """Records a validation; saves the state when it is the best so far. Returns whether to stop early."""
        if not self.metric:
            return False
        if self.metric not in val:
            raise UserError(f"config key 'train.best_metric' is {self.metric!r}, but validation reports "
                            f"{', '.join(sorted(val))}; pick one of those")
        value = float(val[self.metric])
        lower = self.metric in LOWER_IS_BETTER
        if self.value is None or (value < self.value if lower else value > self.value):
            self.value, self.step, self.stale = value, step, 0
            checkpoint.save(self.manager, state, dict(metadata, **self.progress()), force=True)
            checkpoint.finalize(self.manager)
        else:
            self.stale += 1
        return bool(self.patience) and self.stale >= self.patience

    def progress(self) -> dict[str, Any]:
        if not self.metric or self.value is None:
            return {}
        return {"best_metric": self.metric, "best_value": self.value, "best_step": self.step,
                "stale_validations": self.stale}

    def summary(self) -> dict[str, Any]:
        if not self.metric or self.value is None:
            return {}
        return {"best_step": self.step, f"best_val_{self.metric}": self.value}

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


class NonFiniteError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _account(window: "_Window", step: int, metrics, token_counts, config: Config) -> None:
    """Adds a finished step to the log window; stops the run after too many non-finite steps in a row."""
    if not window.add(metrics, token_counts):
        return
    log.warning("step %d: loss or gradients not finite; update skipped (%d in a row)", step + 1,
                window.consecutive_nonfinite)
    if window.consecutive_nonfinite >= config.train.max_nonfinite_steps:
        raise NonFiniteError(
            f"training stopped at step {step + 1}: {window.consecutive_nonfinite} consecutive steps with non-finite "
            f"loss or gradients (limit train.max_nonfinite_steps); the newest checkpoint is intact; lower "
            f"optimizer.learning_rate or check the data, then rerun to resume")


class _Preemption:
    """SIGTERM -> save and stop. One process: a signal handler; several: JAX's agreed preemption sync point."""

    def __init__(self, manager):
        self.manager, self.requested, self.previous = manager, False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _skip_to(data_iterator: grain.DatasetIterator, index: int, task: Task) -> None:
    """Positions an iterator at batch `index` for checkpoints saved before iterator state was kept."""
    if task.pretraining:
        log.warning("the checkpoint holds no data-iterator state; pretraining data restarts from its beginning")
        return
    data_iterator.set_state({"next_index": int(index)})


def _token_counts(local: dict[str, np.ndarray], task: Task) -> tuple[int, int]:
    """Real (non-pad) and padded token counts of the global batch, over the task's token entries."""
    real = sum(int(np.count_nonzero(local[k] != PAD_ID)) for k in task.token_keys)
    padded = sum(int(local[k].size) for k in task.token_keys)
    return real * jax.process_count(), padded * jax.process_count()


class _Window:
    """Accumulates step metrics between log records."""

    def __init__(self):
        self.consecutive_nonfinite = 0
        self.reset()

    def reset(self):
        self.sums: dict[str, float] = {}
        self.steps, self.real_tokens, self.padded_tokens, self.started = 0, 0, 0, time.perf_counter()
        self.nonfinite_steps = 0

    def add(self, metrics, token_counts: tuple[int, int]) -> bool:
        """Adds one step; returns True when that step was skipped as non-finite."""
        metrics = jax.device_get(metrics)
        self.steps += 1
        self.real_tokens += token_counts[0]
        self.padded_tokens += token_counts[1]
        if metrics["nonfinite"]:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            return True
        self.consecutive_nonfinite = 0
        for k in ("loss_sum", "nll_sum", "correct", "tokens"):
            self.sums[k] = self.sums.get(k, 0.0) + float(metrics[k])
        self.sums["grad_norm"] = float(metrics["grad_norm"])
        self.sums["learning_rate"] = float(metrics["learning_rate"])
        return False

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        sums = {"loss_sum": float("nan"), "nll_sum": float("nan"), "correct": 0.0, "tokens": 0.0,
                "grad_norm": float("nan"), "learning_rate": float("nan"), **self.sums}
        out = summarize(sums)
        out.update(grad_norm=sums["grad_norm"], learning_rate=sums["learning_rate"],
                   nonfinite_steps=self.nonfinite_steps,
                   tokens_per_second=self.real_tokens / elapsed,
                   padding_fraction=1.0 - self.real_tokens / max(self.padded_tokens, 1),
                   padded_tokens_per_second=self.padded_tokens / elapsed,
                   steps_per_second=self.steps / elapsed)
        self.reset()
        return out


def _progress_bar(start: int, config: Config, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()  # in log files, a line every 30 s instead of a redraw every 0.1 s
    return tqdm(total=config.train.steps, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc=config.name, mininterval=0.1 if interactive else 30.0)
