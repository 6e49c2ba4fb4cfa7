"""Matmul throughput of XLA (through jax) and of PyTorch on the shapes of a training step, float32 and bfloat16.

    JAX_PLATFORMS=cpu python benchmarks/matmul_rates.py [--tokens 3072] [--d-model 256] [--d-ff 1024]
        [--vocab 8000] [--threads 2] [--repeats 20]

For each projection of a [tokens, d_model] batch (attention, MLP in and out, output projection) it times the three
matmuls of training: forward x @ w, the input gradient g @ w.T and the weight gradient x.T @ g. Each framework runs
in its own subprocess so neither's thread pool competes with the other's. bfloat16 rows multiply bfloat16 operands
with float32 accumulation (jnp.dot with preferred_element_type, torch.matmul on bfloat16 tensors). Prints GFLOP/s
side by side and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

KINDS = ("forward", "input_grad", "weight_grad")


def shapes(tokens: int, d_model: int, d_ff: int, vocab: int) -> dict[str, tuple[int, int, int]]:
    """name -> (M, K, N) of the forward matmul [M, K] x [K, N]."""
    return {"attention projection": (tokens, d_model, d_model), "MLP in": (tokens, d_model, d_ff),
            "MLP out": (tokens, d_ff, d_model), "output projection": (tokens, d_model, vocab)}


def _median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def measure_jax(table, dtype: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    low = dtype == "bfloat16"
    cast = (lambda a: a.astype(jnp.bfloat16)) if low else (lambda a: a)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot_bt = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32))
    dot_at = jax.jit(lambda a, b: jnp.dot(a.T, b, preferred_element_type=jnp.float32))
    out = {}
    key = jax.random.key(0)
    for name, (m, k, n) in table.items():
        x, w, g = (cast(jax.random.normal(key, s)) for s in ((m, k), (k, n), (m, n)))
        runs = {"forward": lambda: dot(x, w).block_until_ready(),
                "input_grad": lambda: dot_bt(g, w).block_until_ready(),
                "weight_grad": lambda: dot_at(x, g).block_until_ready()}
        out[name] = {kind: 2 * m * k * n / _median_seconds(runs[kind], repeats) / 1e9 for kind in KINDS}
    return out


def measure_torch(table, dtype: str, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    out = {}
    for name, (m, k, n) in table.items():
        x, w, g = (torch.randn(*s).to(kind) for s in ((m, k), (k, n), (m, n)))
        runs = {"forward": lambda: x @ w, "input_grad": lambda: g @ w.T, "weight_grad": lambda: x.T @ g}
        out[name] = {k_: 2 * m * k * n / _median_seconds(runs[k_], repeats) / 1e9 for k_ in KINDS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3072, help="rows of a batch (default: 64 pairs x 48)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    table = shapes(args.tokens, args.d_model, args.d_ff, args.vocab)
    if args.worker:
        measured = (measure_jax(table, args.dtype, args.repeats) if args.worker == "jax"
                    else measure_torch(table, args.dtype, args.repeats, args.threads))
        print(json.dumps(measured))
        return

    results = {}
    for dtype in ("float32", "bfloat16"):
        for worker in ("jax", "torch"):
            cmd = [sys.executable, __file__, "--worker", worker, "--dtype", dtype] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "dtype")]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            if done.returncode:
                raise SystemExit(f"error: the {worker} {dtype} worker failed: {done.stderr.strip()[-500:]}")
            results[f"{worker} {dtype}"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"GFLOP/s, [{args.tokens} tokens]; torch on {args.threads} threads")
    print(f"{'matmul':42s} " + " ".join(f"{c:>15s}" for c in results))
    for name, (m, k, n) in table.items():
        for kind in KINDS:
            label = f"{name} {kind} ({m}x{k}x{n})"
            print(f"{label:42s} " + " ".join(f"{results[c][name][kind]:15.0f}" for c in results))
    print(json.dumps({"tokens": args.tokens, "threads": args.threads, "gflops": results}))


if __name__ == "__main__":
    main()
