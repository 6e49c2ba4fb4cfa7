"""The training loop: a jitted, sharded train_step fed by the grain pipeline, with validation and checkpoints."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.data import pipeline
from crosswrite_jax.models.transformer import PAD_ID, EncoderDecoder, build_model, example_inputs
from crosswrite_jax.preflight import check_params
from crosswrite_jax.optim import count_parameters, learning_rate_schedule, make_optimizer, tree_bytes
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.state import StateLayout, TrainState, create_state, state_layout, strip_boxes

log = logging.getLogger("crosswrite")


def token_losses(logits: jax.Array, targets: jax.Array, label_smoothing: float) -> dict[str, jax.Array]:
    """Summed (label-smoothed) loss, NLL, correct tokens and token count over non-pad targets."""
    weights = (targets != PAD_ID).astype(jnp.float32)
    vocab = logits.shape[-1]
    on, off = 1.0 - label_smoothing, label_smoothing / vocab
    soft = jax.nn.one_hot(targets, vocab) * on + off
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.sum(soft * log_probs, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


def make_train_step(model: EncoderDecoder, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float, dropout_seed: int) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`; dropout keys derive from the step, so resume is exact.

    A step whose loss or gradients are not finite leaves params and optimizer state unchanged
    (metrics['nonfinite'] is 1); the step counter still advances past its batch.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

        def loss_fn(params):
            logits = model.apply({"params": params}, **batch, deterministic=False, rngs={"dropout": rng})
            sums = token_losses(logits, batch["targets"], label_smoothing)
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


def make_eval_step(model: EncoderDecoder, label_smoothing: float) -> Callable[[Any, dict], dict]:
    """`eval_step(params, batch) -> summed losses`, teacher-forced, no dropout."""

    def eval_step(params, batch):
        logits = model.apply({"params": params}, **batch, deterministic=True)
        return token_losses(logits, batch["targets"], label_smoothing)

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
    model: nn.Module
    tx: optax.GradientTransformation
    labels: Any
    layout: StateLayout
    schedule: optax.Schedule
    init_params: Callable[[jax.Array], Any]

    @classmethod
    def build(cls, config: Config, mesh: Mesh) -> "Trainer":
        rules = sharding.logical_rules(config.mesh.rules)
        model = build_model(config.model)
        dummy = example_inputs(config.model)
        init = lambda key: model.init({"params": key}, *dummy)["params"]  # noqa: E731
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(init, jax.random.key(0))
            tx, labels = make_optimizer(config.optimizer, strip_boxes(boxed), config.train.steps)
            layout = state_layout(boxed, tx, mesh, rules)
        return cls(config, mesh, rules, model, tx, labels, layout,
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
        step = make_train_step(self.model, self.tx, self.schedule, self.config.train.label_smoothing,
                               self.config.train.seed + 1)
        batch = sharding.batch_sharding(self.mesh)
        return jax.jit(step, in_shardings=(self.layout.shardings, batch),
                       out_shardings=(self.layout.shardings, sharding.replicated(self.mesh)), donate_argnums=0)

    def jit_eval_step(self):
        step = make_eval_step(self.model, self.config.train.label_smoothing)
        return jax.jit(step, in_shardings=(self.layout.shardings.params, sharding.batch_sharding(self.mesh)),
                       out_shardings=sharding.replicated(self.mesh))

    def parameter_report(self) -> dict[str, int]:
        """Trainable / frozen counts and optimizer-state bytes, from shapes alone."""
        counts = count_parameters(self.layout.abstract.params, self.labels)
        return dict(counts, optimizer_state_bytes=tree_bytes(self.layout.abstract.opt_state))


def _params_from(path: str, trainer: Trainer) -> Any:
    """Parameters of another run's checkpoint, checked against this model and placed in its shards."""
    _, checkpoint_dir, step = workdir_lib.locate_checkpoint(path)
    manager = checkpoint.open_manager(checkpoint_dir, read_only=True)
    try:
        newest = step if step is not None else manager.latest_step()
        if newest is not None:
            check_params(checkpoint_dir / str(newest), trainer.layout.abstract.params)
        params, _, _ = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params, step)
    finally:
        manager.close()
    return params


def _validate(trainer: Trainer, eval_step, params, val_dataset, num_batches: int) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    with trainer.context():
        for i in range(num_batches):
            sums = jax.device_get(eval_step(params, to_global_batch(val_dataset[i], trainer.mesh)))
            for k in totals:
                totals[k] += float(sums[k])
    return summarize(totals)


def make_dataset(pairs, tokenizer, config: Config, seed: int, shuffle: bool = True):
    """The grain dataset of training batches (packed or bucketed, as configured) for this process."""
    d = config.data
    common = dict(global_batch_size=config.train.batch_size, seed=seed, process_index=jax.process_index(),
                  process_count=jax.process_count())
    if d.packing:
        return pipeline.packed_train_dataset(pairs, tokenizer, source_length=d.max_source_length,
                                             target_length=d.max_target_length, **common)
    return pipeline.train_dataset(pairs, tokenizer, max_source_length=d.max_source_length,
                                  max_target_length=d.max_target_length, bucket_lengths=d.bucket_lengths,
                                  length_grouping_window=d.length_grouping_window if shuffle else 1, **common)


def train(config: Config, workdir: str | Path, stop_at: int | None = None) -> dict[str, Any]:
    """Trains (resuming from the newest checkpoint in `workdir`) and returns the last metrics.

    `stop_at` ends this invocation early at that step, with a checkpoint, as a preemption would.
    """
    run = workdir_lib.prepare(config, workdir)
    config, tokenizer = run.config, run.tokenizer
    mesh = sharding.make_mesh(config.mesh.shape)
    ways = sharding.data_parallel_size(mesh)
    if config.train.batch_size % ways:
        raise UserError(f"config key 'train.batch_size' ({config.train.batch_size}) must be a multiple of the "
                        f"data-parallel size {ways} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
    trainer = Trainer.build(config, mesh)
    is_main = jax.process_index() == 0
    report = trainer.parameter_report()
    if is_main:
        total = report["total"]
        log.info("mesh %s, rules %s", dict(mesh.shape), config.mesh.rules)
        log.info("parameters: %s trainable (%.1f%%), %s frozen; optimizer state %.2f MB",
                 f"{report['trainable']:,}", 100 * report["trainable"] / total, f"{report['frozen']:,}",
                 report["optimizer_state_bytes"] / 1e6)

    manager = checkpoint.open_manager(run.checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save)
    if manager.latest_step() is not None:
        check_params(run.checkpoint_dir / str(manager.latest_step()), trainer.layout.abstract.params)
        state, metadata = checkpoint.restore_state(manager, trainer.layout)
        workdir_lib.check_tokenizer(metadata, tokenizer, run.checkpoint_dir)
        if is_main:
            log.info("resumed from step %d", int(state.step))
    elif config.train.init_from:
        state = trainer.state_from_params(_params_from(config.train.init_from, trainer))
        if is_main:
            log.info("started from the parameters of %s", config.train.init_from)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))

    train_data = make_dataset(run.read_split(config.data.train_split), tokenizer, config, config.train.seed)
    val_data = None
    if config.train.eval_every > 0:
        val_data = make_dataset(run.read_split(config.data.eval_split), tokenizer, config, seed=0, shuffle=False)

    writer = MetricsWriter(run.workdir, enabled=is_main)
    train_step, eval_step = trainer.jit_train_step(), trainer.jit_eval_step()
    metadata = {"tokenizer_fingerprint": tokenizer.fingerprint, "data_index": start}
    last: dict[str, Any] = {}
    progress = _progress_bar(start, config, enabled=is_main and config.train.progress_bar)
    window = _Window()
    pending = None  # metrics of the step before, read after the next one is dispatched
    end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
    preemption = _Preemption(manager)
    try:
        with trainer.context():
            for step in range(start, end):
                local = train_data[step]
                state, metrics = train_step(state, to_global_batch(local, mesh))
                if pending is not None:
                    _account(window, *pending, config)
                pending = (step, metrics, _token_counts(local))
                done = step + 1
                if done % config.train.log_every == 0 or done == end:
                    _account(window, *pending, config)
                    pending = None
                    last = window.flush()
                    writer.write(done, "train", last)
                    progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_second']:.0f}",
                                         lr=f"{last['learning_rate']:.2e}", refresh=False)
                progress.update(1)
                if val_data is not None and (done % config.train.eval_every == 0 or done == config.train.steps):
                    val = _validate(trainer, eval_step, state.params, val_data, config.train.eval_batches)
                    writer.write(done, "val", val)
                    last.update({f"val_{k}": v for k, v in val.items()})
                if preemption.reached(done):
                    checkpoint.save(manager, state, dict(metadata, data_index=done), force=True)
                    log.warning("preempted: saved step %d; run the same command again to resume", done)
                    last["preempted_at"] = done
                    break
                in_nonfinite_streak = window.consecutive_nonfinite > 0  # no save while steps are being skipped
                if (done % config.checkpoint.every == 0 or done == end) and not in_nonfinite_streak:
                    checkpoint.save(manager, state, dict(metadata, data_index=done), force=True)
    finally:
        preemption.close()
        progress.close()
        checkpoint.finalize(manager)  # waits for the last async save, then writes its checksum manifest
        manager.close()
        writer.close()
    return last


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


def _token_counts(local: dict[str, np.ndarray]) -> tuple[int, int]:
    """Real (non-pad) and padded token counts of the global batch, source and target together."""
    real = sum(int(np.count_nonzero(local[k] != PAD_ID)) for k in ("inputs", "targets"))
    padded = sum(int(local[k].size) for k in ("inputs", "targets"))
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
