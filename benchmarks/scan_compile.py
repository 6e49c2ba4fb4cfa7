"""Compiling a training step with the layers unrolled (a Python loop) against `model.scan_layers` (one nn.scan), by
depth: seconds to trace and lower, seconds to compile, the compiler's peak host memory, and the program's size.

    JAX_PLATFORMS=cpu python benchmarks/scan_compile.py [--layers 4,8,16,32] [--d-model 256] [--repeats 2]

Each point runs in a fresh subprocess (no compilation cache), so its peak resident memory (ru_maxrss) grows only
with what that compile needs; "compile MiB" is that peak minus the peak before compiling. Each point runs
`--repeats` times, alternating unrolled and scanned, and the table keeps each figure's minimum. The model is a small
Llama-style decoder (vocabulary 8,000, 4 heads, d_ff 4 x d_model, rows of 128 tokens, 8 rows), the step the
causal_lm task trains with (AdamW, one CPU device). Prints a table and a JSON line. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(layers: int, scan: bool, d_model: int) -> dict:
    """One point, in this process: lower and compile the train step, report times, memory and program size."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from crosswrite_jax import sharding
    from crosswrite_jax.compile_check import abstract_batch
    from crosswrite_jax.config import Config, DataConfig, MeshConfig, TrainConfig
    from crosswrite_jax.models.presets import llama
    from crosswrite_jax.trainer import Trainer

    model = llama(vocab_size=8000, d_model=d_model, num_heads=4, d_ff=4 * d_model, num_decoder_layers=layers,
                  max_length=128, dropout_rate=0.0, scan_layers=scan)
    config = Config(task="causal_lm", model=model, data=DataConfig(max_source_length=128, max_target_length=128),
                    train=TrainConfig(batch_size=8), mesh=MeshConfig(shape=(1, 1, 1)))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = Trainer.build(config, mesh)
    state, batch = trainer.layout.abstract_with_shardings(), abstract_batch(config, mesh)
    with trainer.context():
        started = time.perf_counter()
        lowered = trainer.jit_train_step().lower(state, batch)
        lower_s = time.perf_counter() - started
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"layers": layers, "scan": scan, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
            "compile_mib": round((peak - before) / 1024, 1), "peak_mib": round(peak / 1024, 1),
            "hlo_kib": round(len(compiled.as_text()) / 1024, 1),
            "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)}


def run_point(layers: int, scan: bool, d_model: int) -> dict:
    """One point in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    out = subprocess.run([sys.executable, __file__, "--point", f"{layers},{int(scan)}", "--d-model", str(d_model)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(points: list[dict]) -> str:
    """Unrolled and scanned side by side per depth, with unrolled / scanned ratios."""
    columns = (("lower s", "lower_s", 2), ("compile s", "compile_s", 2), ("compile MiB", "compile_mib", 0),
               ("HLO KiB", "hlo_kib", 0), ("temp MiB", "temp_mib", 0))
    rows = [f"{'layers':>6s} | " + " | ".join(f"{title:^20s}" for title, _, _ in columns),
            f"{'':>6s} | " + " | ".join(f"{'unroll':>7s} {'scan':>6s} {'ratio':>5s}" for _ in columns)]
    for layers in sorted({p["layers"] for p in points}):
        u, s = (next(p for p in points if p["layers"] == layers and p["scan"] == scan) for scan in (False, True))
        cells = [f"{u[key]:>7.{digits}f} {s[key]:>6.{digits}f} {u[key] / max(s[key], 1e-9):>4.1f}x"
                 for _, key, digits in columns]
        rows.append(f"{layers:>6d} | " + " | ".join(cells))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8,16,32", help="depths to compare")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each point; the table keeps the minimum")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # 'layers,scan': measure one point (the subprocess)
    args = parser.parse_args()
    if args.point:
        layers, scan = (int(x) for x in args.point.split(","))
        print(json.dumps(measure(layers, bool(scan), args.d_model)))
        return
    runs = [run_point(int(n), scan, args.d_model) for _ in range(args.repeats) for n in args.layers.split(",")
            for scan in (False, True)]
    points = [{key: min(r[key] for r in runs if (r["layers"], r["scan"]) == (p["layers"], p["scan"])) for key in p}
              for p in runs[:len(runs) // args.repeats]]
    print(f"train step of a Llama-style decoder, d_model {args.d_model}, 8 x 128 tokens, one CPU device")
    print(table(points))
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
