"""Model FLOPs per training step for the three families, a measured CPU matmul peak, and MFU.

The formula counts matrix multiplications only (2 FLOPs per multiply-add), per example row:

    forward = sum over projections of 2 * in_features * out_features * tokens_it_reads
            + attention: 2 * 2 * T_q * T_k * heads * head_dim per attention layer (q.k^T and weights.v)
            + output projection: 2 * d_model * vocab_size per output token (plus BERT's MLM transform)

    projections per layer   query / out: d x (heads * head_dim); key / value: d x (kv_heads * head_dim);
                            MLP: d x d_ff (x2 when gated) + d_ff x d
    encoder layers          self-attention over S source tokens (T_q = T_k = S)
    decoder layers          causal self-attention over T target tokens (T_q = T_k = T); in an encoder-decoder
                            also cross-attention: query / out over T tokens, key / value over S, T_q = T, T_k = S
    training                3 x forward (the backward pass costs two matmuls for each forward one)

Causal self-attention: XLA (and every non-fused kernel) computes the full T x T score matrix and masks it,
so the default counts it whole; `causal_halving=True` counts half of it, as a kernel that skips masked
blocks would do (the convention of some MFU reports). Embedding lookups, norms, activations, softmax and
the optimizer update are not counted: they are memory-bound and a few percent of the total at d_model >= 256.

On CPU the peak is measured, not looked up: `measure_matmul_peak` times a float32 matmul (bench does it in its
own process; `crosswrite train` reads the figure `measure_host_peak` measured once per host in a subprocess, or
CROSSWRITE_PEAK_FLOPS when set). On TPUs and NVIDIA GPUs it is the chip's dense bfloat16 peak from a table
(`device_peak_flops`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from crosswrite_jax.chips import CHIPS
from crosswrite_jax.config import ModelConfig


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one batch, by part; `training` is 3x the forward total."""

    projections: float  # attention and MLP weight matmuls
    attention: float  # q.k^T and weights.v
    output: float  # output projection / MLM head

    @property
    def forward(self) -> float:
        return self.projections + self.attention + self.output

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def _head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.num_heads


def _layer_matmul_params(m: ModelConfig) -> tuple[int, int, int]:
    """(query + out, key + value, MLP) weights of one layer, as multiply-adds per token."""
    h = _head_dim(m)
    kv_heads = m.num_kv_heads or m.num_heads
    query_out = 2 * m.d_model * m.num_heads * h
    key_value = 2 * m.d_model * kv_heads * h
    mlp = (3 if m.gated_mlp else 2) * m.d_model * m.d_ff
    return query_out, key_value, mlp


def _attention(m: ModelConfig, rows: int, queries: int, keys: int, causal: bool, causal_halving: bool) -> float:
    share = 0.5 if causal and causal_halving else 1.0
    return share * 4.0 * rows * queries * keys * m.num_heads * _head_dim(m)


def step_flops(m: ModelConfig, batch: int, source_length: int = 0, target_length: int = 0,
               causal_halving: bool = False) -> StepFlops:
    """FLOPs of one batch of `batch` rows: sources of `source_length` (encoder, encoder-decoder) and targets of
    `target_length` (decoder, encoder-decoder) tokens; an encoder-only model reads source_length tokens."""
    query_out, key_value, mlp = _layer_matmul_params(m)
    projections = attention = output = 0.0
    if m.family in ("encoder", "encoder_decoder"):
        tokens = batch * source_length
        projections += m.num_encoder_layers * 2.0 * tokens * (query_out + key_value + mlp)
        attention += m.num_encoder_layers * _attention(m, batch, source_length, source_length, False, causal_halving)
    if m.family in ("decoder", "encoder_decoder"):
        tokens = batch * target_length
        per_layer = 2.0 * tokens * (query_out + key_value + mlp)
        scores = _attention(m, batch, target_length, target_length, True, causal_halving)
        if m.family == "encoder_decoder":  # cross-attention: keys and values come from the source
            per_layer += 2.0 * tokens * query_out + 2.0 * batch * source_length * key_value
            scores += _attention(m, batch, target_length, source_length, False, causal_halving)
        projections += m.num_decoder_layers * per_layer
        attention += m.num_decoder_layers * scores
        if m.head == "classification":  # the last real token's state, to the labels
            output = 2.0 * batch * m.d_model * m.num_labels
        else:
            output = 2.0 * tokens * m.d_model * m.vocab_size
    if m.family == "encoder":
        tokens = batch * source_length
        if m.head == "mlm":  # dense transform, then the tied vocabulary projection (at most N positions a row)
            predicted = batch * min(source_length, m.mlm_max_predictions or source_length)
            output = 2.0 * predicted * (m.d_model * m.d_model + m.d_model * m.vocab_size)
        elif m.head == "token_classification":
            output = 2.0 * tokens * m.d_model * m.num_labels
        elif m.head == "classification":
            output = 2.0 * batch * (m.d_model * m.d_model + m.d_model * m.num_labels)
        if m.pooler and m.head == "none":  # the MLM / tagging heads skip the pooler
            output += 2.0 * batch * m.d_model * m.d_model
    return StepFlops(projections=projections, attention=attention, output=output)


def batch_lengths(family: str, batch: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """(rows, source_length, target_length) of a batch for a model.family, for `step_flops`; an encoder's
    `targets` (MLM's) are labels, not a sequence a decoder reads, and a decoder classifier's sequence is its
    `inputs`."""
    rows = int(next(iter(batch.values())).shape[0])
    source = int(batch["inputs"].shape[1]) if "inputs" in batch else 0
    target = int(batch["targets"].shape[1]) if "targets" in batch and family != "encoder" else 0
    if family == "decoder" and "targets" not in batch:  # a decoder classifier reads its inputs
        source, target = 0, source
    return rows, source, target


def training_flops(m: ModelConfig, batch: Mapping[str, np.ndarray], causal_halving: bool = False) -> float:
    """Model FLOPs of one training step on this batch (3x forward)."""
    rows, source, target = batch_lengths(m.family, batch)
    return step_flops(m, rows, source, target, causal_halving).training


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """FLOP/s of the best of `repeats` jitted size x size matmuls on the first device (compile excluded)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return flops_per_step / max(step_seconds, 1e-12) / max(peak_flops_per_second, 1e-12)


# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's data sheets, matched in order against a
# lower-cased device_kind such as "nvidia h100 80gb hbm3" (more specific names first).
GPU_PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h200 nvl", 835e12), ("h100", 989e12), ("h200", 989e12),
    ("gh200", 989e12), ("a100", 312e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12), ("a10", 125e12),
)
_TPU_NAMES = {"tpuv4": "v4", "tpuv5lite": "v5e", "tpuv5e": "v5e", "tpuv5p": "v5p", "tpuv6lite": "v6e",
              "tpuv6e": "v6e"}


def device_peak_flops(device=None) -> float | None:
    """Dense bf16 peak of a known accelerator (TPU chips from chips.CHIPS, NVIDIA GPUs from
    GPU_PEAK_FLOPS); None for CPUs and unknown chips."""
    import jax

    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform == "gpu":
        return next((peak for name, peak in GPU_PEAK_FLOPS if name in kind), None)
    if device.platform != "tpu":
        return None
    chip = CHIPS.get(_TPU_NAMES.get(kind.replace(" ", ""), ""))  # e.g. "TPU v5 lite", "TPU v4"
    return chip.peak_flops if chip else None


PEAK_ENV = "CROSSWRITE_PEAK_FLOPS"  # FLOP/s of the whole host or chip set, for a CPU or a chip the table lacks


def host_peak_path() -> Path:
    """Where this host's measured CPU matmul peak is kept (beside the compilation cache)."""
    from crosswrite_jax.compile_cache import cache_home, host_fingerprint

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cache_home() / "peak" / f"{host_fingerprint()}-{cores}cores.json"


def known_host_peak() -> tuple[float | None, str | None]:
    """(FLOP/s, source) of the CPU host: CROSSWRITE_PEAK_FLOPS, else the measurement kept for this host, else
    (None, None). Never measures."""
    if os.environ.get(PEAK_ENV):
        try:
            return float(os.environ[PEAK_ENV]), PEAK_ENV
        except ValueError:
            from crosswrite_jax.errors import UserError
            raise UserError(f"{PEAK_ENV} must be a number of FLOP/s such as 2.5e11, got {os.environ[PEAK_ENV]!r}")
    try:
        kept = json.loads(host_peak_path().read_text())
        return float(kept["flops_per_second"]), f"measured f32 matmul on this host ({kept['measured']})"
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def measure_host_peak(size: int = 2048) -> float:
    """Measures the f32 matmul peak in a subprocess (nothing in this process changes) and keeps it for this host."""
    code = f"from crosswrite_jax.flops import measure_matmul_peak; print(measure_matmul_peak({size}))"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    peak = float(done.stdout.split()[-1])
    path = host_peak_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"flops_per_second": peak, "size": size,
                                   "measured": time.strftime("%Y-%m-%d %H:%M")}))
    partial.replace(path)
    return peak
