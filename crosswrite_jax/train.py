"""The training loop: the sharded train step fed by the task's batches, with logging, validation, the best
checkpoint, early stopping, preemption and the non-finite guard; resumes from the newest checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np

from crosswrite_jax import checkpoint, flops, peft, sharding
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.batches import training_batches, with_labels
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import Validator
from crosswrite_jax.initialize import params_from
from crosswrite_jax.losses import SUMS, summarize
from crosswrite_jax.models.transformer import PAD_ID
from crosswrite_jax.preflight import check_params
from crosswrite_jax.profiling import CompileCounter, PhaseClock, StepProfiler
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.state import TrainState
from crosswrite_jax.tasks import Task, check_config
from crosswrite_jax.trainer import Trainer

log = logging.getLogger("crosswrite")


def train(config: Config, workdir: str | Path, stop_at: int | None = None,
          on_validation: Callable[[int, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Trains (resuming from the newest checkpoint in `workdir`) and returns the last metrics.

    `stop_at` ends this invocation early at that step, with a checkpoint, as a preemption would.
    `on_validation(step, metrics)` sees each validation after the first step; when it returns True the run stops
    there with a checkpoint (a sweep's pruner), and the result holds `pruned_at`.
    """
    started, compiles, clock = time.perf_counter(), CompileCounter(), PhaseClock()
    new_directory = not Path(workdir).exists()
    try:  # every check and every input read before config.json is written
        run, trainer = _prepare(config, workdir, clock)
        config = run.config
        report = trainer.parameter_report()
        if jax.process_index() == 0:
            _log_sizes(config, trainer, report)
        data_iterator = iter(training_batches(run, trainer.task))
        clock.mark("data")
        manager = checkpoint.open_manager(run.checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep,
                                          async_save=config.checkpoint.async_save)
        state, resumed = _initial_state(run, trainer, manager, data_iterator)
        clock.mark("parameters")
    except BaseException:
        if new_directory and jax.process_index() == 0:  # a failed first run leaves no directory behind
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    workdir_lib.record_config(run)
    loop = _Loop(run, trainer, manager, data_iterator, state, resumed, stop_at, on_validation, clock)
    ended = False  # the loop ran to its end (not an error or Ctrl-C): only then may the host's peak be measured
    try:
        loop.run()
        ended = not loop.preemption.interrupted
    finally:
        loop.close()
        clock.mark("finish")
        summary = {"trainable_parameters": report["trainable"], "total_parameters": report["total"],
                   "trainable_percent": round(100 * report["trainable"] / report["total"], 3),
                   "optimizer_state_bytes": report["optimizer_state_bytes"], **loop.best.summary(),
                   "seconds": round(time.perf_counter() - started, 1), **compiles.counts(),
                   "phase_seconds": clock.phases}
        peak, source = host_peak_at_finish(measure=ended) if loop.last.get("model_flops_per_second") else (None, None)
        if peak:  # the last logged window's model FLOP/s over the peak
            summary.update(mfu=loop.last["model_flops_per_second"] / peak, peak_flops_per_second=peak,
                           peak_source=source)
        if jax.process_index() == 0:
            log.info("compiled %d programs in %.1f s (%d of them loaded from the compilation cache)",
                     summary["compiled_programs"], summary["compile_seconds"], summary["compile_cache_hits"])
            log.info("wall time by phase: %s", clock.describe())
            if "mfu" in summary:
                log.info("MFU %.1f%% (the last %d steps' model FLOP/s over %.1f GFLOP/s, %s)", 100 * summary["mfu"],
                         config.train.log_every, summary["peak_flops_per_second"] / 1e9, summary["peak_source"])
        loop.writer.write(int(jax.device_get(loop.state.step)), "summary", summary)  # this invocation: wall time, sizes
        loop.writer.close()
    if loop.preemption.interrupted:  # Ctrl-C: saved; the command exits 130 as an interrupted one does
        raise KeyboardInterrupt
    return {**loop.last, **loop.initial, **summary}


def _prepare(config: Config, workdir: str | Path, clock: PhaseClock) -> tuple[workdir_lib.Run, Trainer]:
    """The run directory (config, tokenizer) and the Trainer on this run's mesh, after the batch-size checks."""
    config = with_labels(peft.resolve(config), workdir)
    check_config(config, head_too=True)
    mesh = sharding.make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
    ways = sharding.data_parallel_size(mesh)
    if config.train.batch_size % ways:
        raise UserError(f"config key 'train.batch_size' ({config.train.batch_size}) must be a multiple of the "
                        f"data-parallel size {ways} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % ways:
        raise UserError(f"config key 'train.grad_accum_steps' ({config.train.grad_accum_steps}) leaves microbatches "
                        f"of {micro} rows, not a multiple of the data-parallel size {ways}; lower it")
    run = workdir_lib.prepare(config, workdir)
    clock.mark("run_directory")  # the config checked, the tokenizer loaded or trained
    trainer = Trainer.build(run.config, mesh)
    clock.mark("model")
    return run, trainer


def _log_sizes(config: Config, trainer: Trainer, report: dict[str, int]) -> None:
    total = report["total"]
    log.info("mesh %s, rules %s", dict(trainer.mesh.shape), config.mesh.rules)
    log.info("parameters: %s trainable (%.1f%%), %s frozen; optimizer state %.2f MB",
             f"{report['trainable']:,}", 100 * report["trainable"] / total, f"{report['frozen']:,}",
             report["optimizer_state_bytes"] / 1e6)


def _initial_state(run: workdir_lib.Run, trainer: Trainer, manager,
                   data_iterator: grain.DatasetIterator) -> tuple[TrainState, dict[str, Any]]:
    """(the state to start from, the resumed checkpoint's metadata or {}): the newest checkpoint of the run, else
    train.init_from's parameters with fresh optimizer moments, else a fresh initialisation."""
    config, is_main = run.config, jax.process_index() == 0
    if manager.latest_step() is not None:
        state, metadata = checkpoint.restore_state(
            manager, trainer.layout, data_iterator=data_iterator,
            preflight=lambda step_dir: check_params(step_dir, trainer.layout.abstract.params))
        workdir_lib.check_tokenizer(metadata, run.tokenizer, run.checkpoint_dir)
        if not metadata["data_restored"]:
            _skip_to(data_iterator, metadata.get("data_index", int(state.step)), trainer.task)
        if is_main:
            log.info("resumed from step %d", int(state.step))
        return state, metadata
    if config.train.init_from:
        state = trainer.state_from_params(params_from(config.train.init_from, config, trainer.layout, run.tokenizer))
        if is_main:
            log.info("started from the parameters of %s", config.train.init_from)
        return state, {}
    return trainer.init_state(), {}


class _Loop:
    """One invocation's steps: log windows, validation, the best checkpoint, saves, early stopping, preemption."""

    def __init__(self, run: workdir_lib.Run, trainer: Trainer, manager, data_iterator: grain.DatasetIterator,
                 state: TrainState, resumed: dict[str, Any], stop_at: int | None, on_validation, clock: PhaseClock):
        config = self.config = run.config
        self.clock = clock
        self.on_validation = on_validation
        self.trainer, self.manager, self.data_iterator, self.state = trainer, manager, data_iterator, state
        self.start = start = int(jax.device_get(state.step))
        is_main = jax.process_index() == 0
        self.validate = Validator(run, trainer.layout, trainer.task) if config.train.eval_every > 0 else None
        self.best = _Best(config, trainer.task, run.workdir, resumed)
        self.writer = MetricsWriter(run.workdir, enabled=is_main)
        self.train_step = trainer.jit_train_step()
        self.metadata = {"tokenizer_fingerprint": run.tokenizer.fingerprint, "data_index": start}
        self.last: dict[str, Any] = {}
        self.initial: dict[str, Any] = {}
        if self.validate and start == 0 and config.train.eval_at_start:
            val = self.validate(state.params)
            self.writer.write(0, "val", val)
            self.initial = {f"initial_val_{k}": v for k, v in val.items()}
        self.progress = _progress_bar(start, config, enabled=is_main and config.train.progress_bar)
        self.window = _Window(peak_flops()[0])
        self.pending = None  # metrics of the step before, read after the next one is dispatched
        self.profiler = StepProfiler(run.workdir / "profile", start + 1, config.train.profile_steps, enabled=is_main)
        self.end = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
        self.preemption = _Preemption(manager)
        self.clock.mark("validation_setup")  # the validation data, and the validation at step 0 where asked

    def run(self) -> None:
        """Steps from the state's step to the end (or an early stop), each followed by its bookkeeping."""
        with self.trainer.context():
            for step in range(self.start, self.end):
                local = next(self.data_iterator)
                self.profiler.before(step)
                self.state, metrics = self.train_step(self.state, sharding.to_global_batch(local, self.trainer.mesh))
                self.profiler.after(step, metrics)
                if step in (self.start, self.end - 1):  # the first step's compile; the steps end on the device
                    jax.block_until_ready(metrics)
                    self.clock.mark("first_step" if step == self.start else "steps")
                self._log(step, metrics, local)
                self.progress.update(1)
                if self._stops(step + 1):
                    break
        if "steps" not in self.clock.phases:  # stopped early: the validations and the save so far count as steps
            self.clock.mark("steps")

    def _log(self, step: int, metrics, local: dict[str, np.ndarray]) -> None:
        """Accounts the step before (its metrics are ready now); writes a record every train.log_every steps."""
        if self.pending is not None:
            _account(self.window, *self.pending, self.config)
        self.pending = (step, metrics, _token_counts(local, self.trainer.task, self.config.model))
        done = step + 1
        if done % self.config.train.log_every == 0 or done == self.end:
            _account(self.window, *self.pending, self.config)
            self.pending = None
            self.last = self.window.flush()
            self.writer.write(done, "train", self.last)
            shown = dict(loss=f"{self.last['loss']:.3f}", lr=f"{self.last['learning_rate']:.2e}",
                         tok_s=f"{self.last['tokens_per_second']:.0f}")
            if "mfu" in self.last:  # only where the chip's peak is known
                shown["mfu"] = f"{100 * self.last['mfu']:.1f}%"
            self.progress.set_postfix(shown, refresh=False)

    def _stops(self, done: int) -> bool:
        """Validation and saves after step `done`; whether the run stops here (early stopping, preemption)."""
        config = self.config
        stop_early = pruned = False
        if self.validate and (done % config.train.eval_every == 0 or done == config.train.steps):
            val = self.validate(self.state.params)
            self.writer.write(done, "val", val)
            self.last.update({f"val_{k}": v for k, v in val.items()})
            stop_early = self.best.update(done, val, self.state, dict(self.metadata, data_index=done))
            pruned = bool(self.on_validation and self.on_validation(done, val))
        self.metadata.update(self.best.progress())
        if pruned:
            self._save(done)
            log.info("stopped at step %d: the sweep's pruner stopped this trial", done)
            self.last["pruned_at"] = done
            return True
        if stop_early:
            self._save(done)
            log.info("early stopping at step %d: %s has not improved on %.4f (step %d) for %d validations",
                     done, config.train.best_metric, self.best.value, self.best.step, self.best.stale)
            self.last["stopped_early_at"] = done
            return True
        if self.preemption.reached(done):
            self._save(done)
            log.warning("preempted: saved step %d; run the same command again to resume", done)
            self.last["preempted_at"] = done
            return True
        in_nonfinite_streak = self.window.consecutive_nonfinite > 0  # no save while steps are being skipped
        if (done % config.checkpoint.every == 0 or done == self.end) and not in_nonfinite_streak:
            self._save(done)
        return False

    def _save(self, done: int) -> None:
        checkpoint.save(self.manager, self.state, dict(self.metadata, data_index=done), force=True,
                        data_iterator=self.data_iterator)

    def close(self) -> None:
        self.profiler.close()
        self.preemption.close()
        self.progress.close()
        checkpoint.finalize(self.manager)  # waits for the last async save, then writes its checksum manifest
        self.manager.close()
        self.best.close()


class _Best:
    """Keeps the checkpoint with the best validation `train.best_metric` in WORKDIR/best; counts validations
    without improvement for early stopping. Its progress rides in every checkpoint's metadata, so resume keeps it."""

    def __init__(self, config: Config, task: Task, workdir: Path, resumed: dict[str, Any]):
        self.metric, self.patience = config.train.best_metric, config.train.early_stopping_patience
        self.task = task  # says which direction of the metric is better
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
        lower = self.task.metric_direction(self.metric) == "min"
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
    """SIGTERM, or a first Ctrl-C (SIGINT) -> save at the next step boundary and stop; a second Ctrl-C stops at
    once. One process: signal handlers; several: JAX's agreed preemption sync point."""

    def __init__(self, manager):
        self.manager, self.requested, self.interrupted, self.previous = manager, False, False, {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:
            self.interrupted = True
            log.warning("interrupted: saving at the end of this step (press Ctrl-C again to stop at once)")
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _skip_to(data_iterator: grain.DatasetIterator, index: int, task: Task) -> None:
    """Positions an iterator at batch `index` for checkpoints saved before iterator state was kept."""
    if task.pretraining:
        log.warning("the checkpoint holds no data-iterator state; pretraining data restarts from its beginning")
        return
    data_iterator.set_state({"next_index": int(index)})


def _token_counts(local: dict[str, np.ndarray], task: Task, model: Any) -> tuple[int, int, float]:
    """Real (non-pad) and padded token counts of the global batch, over the task's token entries, and the
    model FLOPs of its training step (crosswrite_jax/flops.py, as `crosswrite bench` counts them)."""
    real = sum(int(np.count_nonzero(local[k] != PAD_ID)) for k in task.token_keys)
    padded = sum(int(local[k].size) for k in task.token_keys)
    count = jax.process_count()
    return real * count, padded * count, flops.training_flops(model, local) * count


def peak_flops() -> tuple[float | None, str | None]:
    """(FLOP/s of all devices at their peak, its source): the chip table (TPU, NVIDIA GPU), else on a CPU host
    CROSSWRITE_PEAK_FLOPS or the matmul peak measured once for this host (see `host_peak_at_finish`). Never
    measured in this process: a matmul run before training changed the quickstart's BLEU (17.57 against 17.11)."""
    peak = flops.device_peak_flops()
    if peak is not None:
        return peak * jax.device_count(), f"table: {jax.devices()[0].device_kind}, bf16 dense"
    if os.environ.get(flops.PEAK_ENV) or jax.devices()[0].platform == "cpu":
        return flops.known_host_peak()  # the host's cores serve every simulated CPU device
    return None, None


def host_peak_at_finish(measure: bool = True) -> tuple[float | None, str | None]:
    """The peak for a run's summary: the known one, else on a CPU host (with `measure`) measured now, once per
    host, in a subprocess."""
    peak, source = peak_flops()
    if peak is not None or not measure or jax.devices()[0].platform != "cpu" or jax.process_index() != 0:
        return peak, source
    log.info("measuring this host's float32 matmul peak for MFU, once (kept in %s)", flops.host_peak_path())
    try:
        return flops.measure_host_peak(), "measured f32 matmul on this host (just now)"
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not measure the host's matmul peak (%s); no MFU in this run's summary", exc)
        return None, None


class _Window:
    """Accumulates step metrics between log records."""

    def __init__(self, peak_flops_per_second: float | None = None):
        self.consecutive_nonfinite = 0
        self.peak = peak_flops_per_second
        self.reset()

    def reset(self):
        self.sums: dict[str, float] = {}
        self.steps, self.real_tokens, self.padded_tokens, self.started = 0, 0, 0, time.perf_counter()
        self.model_flops = 0.0
        self.nonfinite_steps = 0

    def add(self, metrics, token_counts: tuple[int, int, float]) -> bool:
        """Adds one step; returns True when that step was skipped as non-finite."""
        metrics = jax.device_get(metrics)
        self.steps += 1
        self.real_tokens += token_counts[0]
        self.padded_tokens += token_counts[1]
        self.model_flops += token_counts[2]
        if metrics["nonfinite"]:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1
            return True
        self.consecutive_nonfinite = 0
        for k in SUMS:
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
                   steps_per_second=self.steps / elapsed, model_flops_per_second=self.model_flops / elapsed)
        if self.peak:
            out["mfu"] = out["model_flops_per_second"] / self.peak
        self.reset()
        return out


def _progress_bar(start: int, config: Config, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()  # in log files, a line every 30 s instead of a redraw every 0.1 s
    return tqdm(total=config.train.steps, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc=config.name, mininterval=0.1 if interactive else 30.0)
