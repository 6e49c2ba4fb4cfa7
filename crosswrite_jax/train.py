"""The training loop: a jitted, sharded train_step fed by the grain pipeline, with validation and checkpoints."""

from __future__ import annotations

import contextlib
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

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax import config as config_lib
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.data import pipeline, pretraining
from crosswrite_jax.models.transformer import PAD_ID, build_model, example_inputs
from crosswrite_jax.tasks import Task, get_task
from crosswrite_jax.preflight import check_params
from crosswrite_jax.optim import count_parameters, learning_rate_schedule, make_optimizer, tree_bytes
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.state import StateLayout, TrainState, create_state, state_layout, strip_boxes

log = logging.getLogger("crosswrite")


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 label_smoothing: float) -> dict[str, jax.Array]:
    """Summed (label-smoothed) loss, NLL, correct tokens and token count over the weighted targets."""
    vocab = logits.shape[-1]
    on, off = 1.0 - label_smoothing, label_smoothing / vocab
    soft = jax.nn.one_hot(targets, vocab) * on + off
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.sum(soft * log_probs, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float, dropout_seed: int) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`; dropout keys derive from the step, so resume is exact.

    A step whose loss or gradients are not finite leaves params and optimizer state unchanged
    (metrics['nonfinite'] is 1); the step counter still advances past its batch.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

        def loss_fn(params):
            logits, targets, weights = task.forward(model, {"params": params}, batch, False, {"dropout": rng})
            sums = token_losses(logits, targets, weights, label_smoothing)
            return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), sums

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


def make_eval_step(model: nn.Module, task: Task, label_smoothing: float) -> Callable[[Any, dict], dict]:
    """`eval_step(params, batch) -> summed losses`, teacher-forced, no dropout."""

    def eval_step(params, batch):
        logits, targets, weights = task.forward(model, {"params": params}, batch, True, {})
        return token_losses(logits, targets, weights, label_smoothing)

    return eval_step


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
        rules = sharding.logical_rules(config.mesh.rules)
        task = get_task(config.task)
        model = build_model(config.model)
        dummy = example_inputs(config.model)
        init = lambda key: model.init({"params": key}, *dummy)["params"]  # noqa: E731
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda: init(jax.random.key(0)))  # traced key: the mesh may be compile-only
            tx, labels = make_optimizer(config.optimizer, strip_boxes(boxed), config.train.steps)
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
                               self.config.train.seed + 1)
        batch = sharding.batch_sharding(self.mesh)
        return jax.jit(step, in_shardings=(self.layout.shardings, batch),
                       out_shardings=(self.layout.shardings, sharding.replicated(self.mesh)), donate_argnums=0)

    def jit_eval_step(self):
        step = make_eval_step(self.model, self.task, self.config.train.label_smoothing)
        return jax.jit(step, in_shardings=(self.layout.shardings.params, sharding.batch_sharding(self.mesh)),
                       out_shardings=sharding.replicated(self.mesh))

    def parameter_report(self) -> dict[str, int]:
        """Trainable / frozen counts and optimizer-state bytes, from shapes alone."""
        counts = count_parameters(self.layout.abstract.params, self.labels)
        return dict(counts, optimizer_state_bytes=tree_bytes(self.layout.abstract.opt_state))


def _params_from(path: str, trainer: Trainer, tokenizer) -> Any:
    """Parameters of another run's checkpoint, checked against this model and placed in its shards.

    Parameters matching a `train.init_exclude` pattern, or absent from the checkpoint when patterns are
    given, start from fresh initialisation; both lists are logged, with checkpoint entries left unused.
    """
    _, checkpoint_dir, step = workdir_lib.locate_checkpoint(path)
    manager = checkpoint.open_manager(checkpoint_dir, read_only=True)
    exclude = trainer.config.train.init_exclude
    abstract = trainer.layout.abstract_with_shardings().params
    try:
        newest = step if step is not None else manager.latest_step()
        if not exclude:
            if newest is not None:
                check_params(checkpoint_dir / str(newest), trainer.layout.abstract.params)
            params, metadata, _ = checkpoint.restore_params(manager, abstract, step)
        else:
            if newest is None:
                raise UserError(f"train.init_from '{path}' holds no checkpoint; train it first")
            target, fresh_paths, unused = _partial_target(checkpoint_dir / str(newest), abstract, exclude)
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


def _partial_target(step_dir: Path, abstract: Any, exclude: tuple[str, ...]) -> tuple[Any, list[str], list[str]]:
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
    if not trainer.task.pretraining:
        data = make_dataset(run.read_split(config.data.train_split), run.tokenizer, config, config.train.seed)
        return data.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    return _pretraining_dataset(run, config.data.sources, config.train.seed, shuffle=True)


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
    run = workdir_lib.prepare(config, workdir)
    config, tokenizer = run.config, run.tokenizer
    mesh = sharding.make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
    ways = sharding.data_parallel_size(mesh)
    if config.train.batch_size % ways:
        raise UserError(f"config key 'train.batch_size' ({config.train.batch_size}) must be a multiple of the "
                        f"data-parallel size {ways} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
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
    if manager.latest_step() is not None:
        state, metadata = checkpoint.restore_state(
            manager, trainer.layout, data_iterator=data_iterator,
            preflight=lambda step_dir: check_params(step_dir, trainer.layout.abstract.params))
        workdir_lib.check_tokenizer(metadata, tokenizer, run.checkpoint_dir)
        if not metadata["data_restored"]:
            _skip_to(data_iterator, metadata.get("data_index", int(state.step)), trainer.task)
        if is_main:
            log.info("resumed from step %d", int(state.step))
    elif config.train.init_from:
        state = trainer.state_from_params(_params_from(config.train.init_from, trainer, tokenizer))
        if is_main:
            log.info("started from the parameters of %s", config.train.init_from)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))

    val_batches = validation_batches(run, trainer.task) if config.train.eval_every > 0 else None

    writer = MetricsWriter(run.workdir, enabled=is_main)
    train_step, eval_step = trainer.jit_train_step(), trainer.jit_eval_step()
    metadata = {"tokenizer_fingerprint": tokenizer.fingerprint, "data_index": start}
    last: dict[str, Any] = {}
    initial: dict[str, Any] = {}
    if val_batches and start == 0 and config.train.eval_at_start:
        val = _validate(trainer, eval_step, state.params, val_batches)
        writer.write(0, "val", val)
        initial = {f"initial_val_{k}": v for k, v in val.items()}
    progress = _progress_bar(start, config, enabled=is_main and config.train.progress_bar)
    window = _Window()
    pending = None  # metrics of the step before, read after the next one is dispatched
    end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
    preemption = _Preemption(manager)
    try:
        with trainer.context():
            for step in range(start, end):
                local = next(data_iterator)
                state, metrics = train_step(state, to_global_batch(local, mesh))
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
                if val_batches and (done % config.train.eval_every == 0 or done == config.train.steps):
                    val = _validate(trainer, eval_step, state.params, val_batches)
                    writer.write(done, "val", val)
                    last.update({f"val_{k}": v for k, v in val.items()})
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
        preemption.close()
        progress.close()
        checkpoint.finalize(manager)  # waits for the last async save, then writes its checksum manifest
        manager.close()
        writer.close()
    return {**last, **initial}


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
