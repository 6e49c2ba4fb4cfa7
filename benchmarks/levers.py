"""The effect of each performance lever on one config's training step, measured with crosswrite_jax.bench.

    python benchmarks/levers.py [--config configs/quickstart.py] [--steps 5] [--only remat,bf16] [--xla-flags]
        [--config.KEY=VALUE ...]

Variants (each against the config as given, in this one process unless noted):
  packing        data.packing off (length buckets 16..64) vs on
  attention      jax.nn.dot_product_attention vs a hand-written einsum-softmax-einsum
  remat          model.remat none | full | dots | dots_no_batch (step time and compiled temporaries)
  bf16           model.dtype bfloat16 (parameters stay float32)
  donation       the train step jitted without donate_argnums
  accumulation   train.grad_accum_steps 1 vs 4 (same global batch; compiled temporaries)
  chunked_ce     train.logits_chunk_length 16: projection + cross-entropy 16 positions at a time (compiled
                 temporaries; try with a large --config.model.vocab_size=32000)
  async          reported by every run: blocking step time vs back-to-back dispatch
  --xla-flags    each of a few XLA CPU flags, in a subprocess `crosswrite bench` with XLA_FLAGS set
Prints a table and one JSON line. Dropout's PRNGs are compared in benchmarks/dropout_rng.py (alternating rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from crosswrite_jax import bench as bench_lib
from crosswrite_jax import config as config_lib
from crosswrite_jax import trainer as trainer_lib
from crosswrite_jax.models import layers

ROOT = Path(__file__).resolve().parent.parent
XLA_FLAGS = ["--xla_cpu_use_onednn=true", "--xla_cpu_enable_fast_math=true", "--xla_cpu_use_xnnpack=true",
             "--xla_cpu_multi_thread_eigen=false"]


def einsum_attention(q, k, v, mask, bias=None, scale=None):
    """Softmax attention written out: scores, mask, softmax in float32, weighted sum."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores).astype(q.dtype), v)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def jit_without_donation(self):
    step = trainer_lib.make_train_step(self.model, self.task, self.tx, self.schedule, self.config.train.label_smoothing,
                                     self.config.train.seed + 1, self.config.train.grad_accum_steps,
                                     self.config.train.logits_chunk_length, self.config.train.dropout_rng)
    from crosswrite_jax import sharding

    return jax.jit(step, in_shardings=(self.layout.shardings, sharding.batch_sharding(self.mesh)),
                   out_shardings=(self.layout.shardings, sharding.replicated(self.mesh)))


def row(name: str, r: dict) -> dict:
    keys = ("median_step_s", "async_step_s", "real_tokens_per_s", "padded_tokens_per_s", "compile_s", "mfu",
            "compiled_temp_bytes", "compiled_total_bytes", "final_loss")
    out = {k: r.get(k) for k in keys}
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    print(f"{name:34s} {1000 * r['median_step_s']:9.1f} {1000 * r['async_step_s']:9.1f} "
          f"{r['real_tokens_per_s']:10,.0f} {r['padded_tokens_per_s']:10,.0f} {r['compile_s']:8.1f} {mfu:>6s} "
          f"{r['compiled_temp_bytes'] / 2**20:9.1f} {r['compiled_total_bytes'] / 2**20:9.1f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.py"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variant groups (default: all)")
    parser.add_argument("--xla-flags", action="store_true", help="also time XLA CPU flags (subprocesses)")
    args, rest = parser.parse_known_args()
    overrides = config_lib.parse_overrides(rest)
    base = config_lib.override(config_lib.load(args.config), overrides)
    only = set(filter(None, args.only.split(",")))
    want = lambda group: not only or group in only  # noqa: E731
    peak = jax.devices()[0].platform == "cpu"

    def run(cfg_overrides=None):
        cfg = config_lib.override(base, cfg_overrides or {})
        return bench_lib.bench(cfg, steps=args.steps, warmup=args.warmup, measure_peak=peak)

    print(f"{'variant':34s} {'step ms':>9s} {'async ms':>9s} {'real tok/s':>10s} {'pad tok/s':>10s} "
          f"{'compile':>8s} {'MFU':>6s} {'temp MiB':>9s} {'total MiB':>9s}")
    results = {"baseline": row("baseline", run())}
    if want("packing"):
        flip = {"data.packing": not base.data.packing, "train.batch_size": base.train.batch_size * 4
                if base.data.packing else max(base.train.batch_size // 4, 1),
                "data.bucket_lengths": (16, 24, 32, 48, 64)}
        name = "bucketed (4x pairs a batch)" if base.data.packing else "packed (1/4 rows a batch)"
        results[name] = row(name, run(flip))
    if want("attention"):
        with patched(layers, "attention", einsum_attention):
            results["einsum attention"] = row("einsum attention", run())
    if want("remat"):
        for policy in ("full", "dots", "dots_no_batch"):
            results[f"remat {policy}"] = row(f"remat {policy}", run({"model.remat": policy}))
    if want("bf16"):
        results["bfloat16 compute"] = row("bfloat16 compute", run({"model.dtype": "bfloat16"}))
    if want("donation"):
        with patched(trainer_lib.Trainer, "jit_train_step", jit_without_donation):
            results["no donation"] = row("no donation", run())
    if want("accumulation"):
        results["grad_accum_steps 4"] = row("grad_accum_steps 4", run({"train.grad_accum_steps": 4}))
    if want("chunked_ce"):
        results["logits_chunk_length 16"] = row("logits_chunk_length 16", run({"train.logits_chunk_length": 16}))
    if args.xla_flags:
        for flag in XLA_FLAGS:
            env = dict(os.environ, XLA_FLAGS=flag)
            cmd = [sys.executable, "-m", "crosswrite_jax.cli", "bench", "--config", args.config, "--steps",
                   str(args.steps), "--warmup", str(args.warmup), *rest]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{flag}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'})")
                continue
            results[flag] = row(flag, json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({"config": args.config, "overrides": overrides, "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
