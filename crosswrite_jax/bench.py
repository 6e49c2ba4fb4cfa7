"""`crosswrite bench`: steady-state speed, compile time, memory and MFU of a config's training step.

Batches come from the config's own pipeline (bucketing or packing as configured) and are read before timing.
Each distinct batch shape is compiled ahead of time (lower + compile, timed), then:
  - blocking pass: every step ends in `block_until_ready`; after `warmup` steps the median step time is the
    steady-state figure, and real (non-pad) and padded tokens/s are counted over the timed steps;
  - async pass: the same batches dispatched back to back, one wait at the end (what the training loop does).
Model FLOPs come from crosswrite_jax.flops (a documented formula; XLA's count is printed beside it); MFU is
against the measured float32 matmul peak on CPU, or the chip's table peak (dense bfloat16) on TPUs and NVIDIA GPUs.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from crosswrite_jax import flops, peft, sharding
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.batches import training_batches, with_labels
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import PAD_ID
from crosswrite_jax.profiling import cost_analysis, peak_host_bytes
from crosswrite_jax.tasks import check_config
from crosswrite_jax.trainer import Trainer

log = logging.getLogger("crosswrite")


def _shape_key(batch: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, v.shape) for k, v in batch.items()))


def _token_counts(batch: dict[str, np.ndarray], token_keys: tuple[str, ...]) -> tuple[int, int]:
    real = sum(int(np.count_nonzero(batch[k] != PAD_ID)) for k in token_keys if k in batch)
    return real, sum(int(batch[k].size) for k in token_keys if k in batch)


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device, where the backend reports it (GPU, TPU; not CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def trainer_and_batches(config: Config, count: int) -> tuple[Trainer, list[dict[str, np.ndarray]], float]:
    """A Trainer for `config` and its first `count` training batches (and the seconds they took), as `train` makes them.

    The tokenizer is trained in a scratch directory unless data.tokenizer names one (a run's tokenizer/).
    """
    check_config(config, head_too=True)
    with tempfile.TemporaryDirectory(prefix="crosswrite-bench-") as scratch:
        config = with_labels(peft.resolve(config), scratch)  # as `crosswrite train` does: PEFT and label sets
        run = workdir_lib.prepare(config, scratch)
        workdir_lib.record_config(run)
        config = run.config
        mesh = sharding.make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
        if config.train.batch_size % (sharding.data_parallel_size(mesh) * config.train.grad_accum_steps):
            raise UserError(f"config key 'train.batch_size' ({config.train.batch_size}) must be a multiple of the "
                            f"data-parallel size x train.grad_accum_steps")
        trainer = Trainer.build(config, mesh)
        started = time.perf_counter()
        batches = list(itertools.islice(iter(training_batches(run, trainer.task)), count))
        data_seconds = time.perf_counter() - started
    if len(batches) < count:
        raise UserError(f"the training data gives {len(batches)} batches; {count} are needed (--warmup + --steps)")
    return trainer, batches, data_seconds


def bench(config: Config, steps: int = 20, warmup: int = 3, measure_peak: bool = True) -> dict[str, Any]:
    """Measures `steps` timed training steps after `warmup` untimed ones; returns the figures."""
    if steps < 1 or warmup < 0:
        raise UserError(f"bench needs --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    trainer, batches, data_seconds = trainer_and_batches(config, warmup + steps)
    config = trainer.config
    state = trainer.init_state()
    with trainer.context():
        device_batches = [sharding.to_global_batch(b, trainer.mesh) for b in batches]
        compiled, compile_seconds, memory, xla_flops = _compile_shapes(trainer.jit_train_step(), state, batches,
                                                                       device_batches)
        timing = _time_steps(trainer, compiled, xla_flops, state, batches, device_batches, warmup)
    times, real, padded, async_seconds = timing["times"], timing["real"], timing["padded"], timing["async_seconds"]
    total = sum(times)
    median = statistics.median(times)
    peak_total, peak_source = _peak(measure_peak)
    flops_per_second = timing["model_flops"] / total
    parameters = trainer.parameter_report()
    result = {
        "command": "bench", "name": config.name, "task": config.task, "family": config.model.family,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
        "batch_size": config.train.batch_size, "grad_accum_steps": config.train.grad_accum_steps,
        "remat": config.model.remat, "dtype": config.model.dtype, "packing": config.data.packing,
        "steps": steps, "warmup": warmup, "shapes": len(compiled),
        "median_step_s": median, "mean_step_s": total / len(times),
        "async_step_s": async_seconds / timing["timed"],
        "compile_s": compile_seconds, "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "data_batches_per_s": len(batches) / max(data_seconds, 1e-9),
        "real_tokens_per_s": real / total, "padded_tokens_per_s": padded / total,
        "padding_fraction": 1.0 - real / max(padded, 1),
        "async_real_tokens_per_s": real / async_seconds,
        "model_flops_per_step": timing["model_flops"] / len(times),
        "xla_flops_per_step": timing["counted_xla"] / len(times),
        "model_flops_per_s": flops_per_second,
        "peak_flops_per_s": peak_total, "peak_source": peak_source,
        "mfu": flops_per_second / peak_total if peak_total else None,
        "peak_host_bytes": peak_host_bytes(), "device_peak_bytes": device_peak_bytes(),
        "compiled_temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
        "compiled_argument_bytes": int(memory.argument_size_in_bytes) if memory else None,
        # What one step holds at once: arguments, outputs not aliased to (donated) arguments, temporaries.
        "compiled_total_bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                    - memory.alias_size_in_bytes + memory.temp_size_in_bytes) if memory else None,
        "final_loss": timing["loss"],
        "trainable_parameters": parameters["trainable"], "frozen_parameters": parameters["frozen"],
        "total_parameters": parameters["total"], "optimizer_state_bytes": parameters["optimizer_state_bytes"],
    }
    return result


def _compile_shapes(jitted, state, batches: list[dict[str, np.ndarray]], device_batches: list) -> tuple:
    """(compiled step per batch shape, seconds compiling, the first one's memory analysis, XLA FLOPs per shape)."""
    compiled: dict[tuple, Any] = {}
    compile_seconds, memory, xla_flops = 0.0, None, {}
    for batch, device_batch in zip(batches, device_batches):
        key = _shape_key(batch)
        if key not in compiled:
            started = time.perf_counter()
            compiled[key] = jitted.lower(state, device_batch).compile()
            compile_seconds += time.perf_counter() - started
            xla_flops[key] = float(cost_analysis(compiled[key]).get("flops", 0.0))
            if memory is None:
                memory = compiled[key].memory_analysis()
    return compiled, compile_seconds, memory, xla_flops


def _time_steps(trainer: Trainer, compiled: dict, xla_flops: dict, state, batches: list[dict[str, np.ndarray]],
                device_batches: list, warmup: int) -> dict[str, Any]:
    """The blocking pass (step times, tokens and FLOPs after the warm-up), then the async pass over the timed
    batches (one wait at the end) and the last step's loss."""
    config = trainer.config
    times, real, padded, model_flops, counted_xla = [], 0, 0, 0.0, 0.0
    for index, (batch, device_batch) in enumerate(zip(batches, device_batches)):
        started = time.perf_counter()
        state, metrics = compiled[_shape_key(batch)](state, device_batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - started
        if index < warmup:
            continue
        times.append(elapsed)
        counts = _token_counts(batch, trainer.task.token_keys)
        real, padded = real + counts[0], padded + counts[1]
        model_flops += flops.training_flops(config.model, batch)
        counted_xla += xla_flops[_shape_key(batch)] * jax.device_count()

    timed = list(zip(batches, device_batches))[warmup:]
    started = time.perf_counter()
    for batch, device_batch in timed:
        state, metrics = compiled[_shape_key(batch)](state, device_batch)
    jax.block_until_ready((state, metrics))
    async_seconds = time.perf_counter() - started
    return {"times": times, "real": real, "padded": padded, "model_flops": model_flops, "counted_xla": counted_xla,
            "async_seconds": async_seconds, "timed": len(timed),
            "loss": float(metrics["loss_sum"] / max(float(metrics["tokens"]), 1.0))}


def _peak(measure_peak: bool) -> tuple[float | None, str | None]:
    """(peak FLOP/s of all devices, where it comes from): the chip table, else a measured CPU matmul."""
    peak = flops.device_peak_flops()
    peak_total = peak * jax.device_count() if peak else None
    peak_source = f"table: {jax.devices()[0].device_kind}, bf16 dense" if peak else None
    if peak is None and jax.devices()[0].platform == "cpu" and measure_peak:
        peak_total, peak_source = flops.measure_matmul_peak(), "measured f32 matmul"
    return peak_total, peak_source


def format_report(result: dict[str, Any]) -> str:
    """Human-readable lines of a bench result."""
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    lines = [
        f"{result['name']}: {result['task']} ({result['family']}), batch {result['batch_size']}"
        f" (accumulation {result['grad_accum_steps']}), {result['dtype']}, remat {result['remat']},"
        f" {result['devices']} {result['platform']} device(s)",
        f"  step time        median {1000 * result['median_step_s']:.1f} ms (blocking, {result['steps']} steps after "
        f"{result['warmup']} warm-up); async {1000 * result['async_step_s']:.1f} ms",
        f"  compile          {result['compile_s']:.1f} s for {result['shapes']} shape(s)",
        f"  tokens/s         real {result['real_tokens_per_s']:,.0f}, padded {result['padded_tokens_per_s']:,.0f} "
        f"(padding {100 * result['padding_fraction']:.1f}%); async real {result['async_real_tokens_per_s']:,.0f}",
        f"  FLOPs / step     model {result['model_flops_per_step']:.3e}, XLA {result['xla_flops_per_step']:.3e}"
        + (" (XLA counts the accumulation scan's body once)" if result["grad_accum_steps"] > 1 else ""),
    ]
    if result["peak_flops_per_s"]:
        lines.append(f"  MFU              {100 * result['mfu']:.1f}% of {result['peak_flops_per_s'] / 1e9:,.1f} "
                     f"GFLOP/s ({result['peak_source']}); model {result['model_flops_per_s'] / 1e9:,.1f} GFLOP/s")
    lines.append(f"  memory           host peak RSS {mb(result['peak_host_bytes'])}, device peak "
                 f"{mb(result['device_peak_bytes'])}, compiled temporaries {mb(result['compiled_temp_bytes'])} "
                 f"(step total {mb(result['compiled_total_bytes'])})")
    return "\n".join(lines)
