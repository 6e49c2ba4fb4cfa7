"""What dropout costs a training step under each PRNG, timed side by side in one process on the same batches.

    python benchmarks/dropout_rng.py [--config configs/finetune_sst2.py] [--steps 6] [--rounds 3]
        [--config.KEY=VALUE ...]

Variants: train.dropout_rng threefry2x32 (JAX's default), threefry4x32 (the project's default), rbg, unsafe_rbg, and
the same step without dropout (model.dropout_rate 0). Every variant is compiled for every batch shape first; then
the rounds alternate the variants (each times --steps steps over the same batches) and the median round counts.
Prints a table with each variant's step time relative to threefry2x32 and its extra time over no dropout, and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax

from crosswrite_jax import bench as bench_lib
from crosswrite_jax import config as config_lib
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
NO_DROPOUT = "no dropout"


def variants() -> dict[str, dict]:
    out = {impl: {"train.dropout_rng": impl} for impl in config_lib.DROPOUT_RNGS}
    out[NO_DROPOUT] = {"model.dropout_rate": 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "finetune_sst2.py"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    args, rest = parser.parse_known_args()
    base = config_lib.override(config_lib.load(args.config), config_lib.parse_overrides(rest))
    if base.model.dropout_rate <= 0:
        raise SystemExit(f"error: {args.config} has model.dropout_rate 0; pass --config.model.dropout_rate=0.1")

    trainer, batches, _ = bench_lib.trainer_and_batches(base, args.steps)
    runs = {}
    for name, overrides in variants().items():
        t = Trainer.build(config_lib.override(trainer.config, overrides), trainer.mesh)
        with t.context():
            state, step = t.init_state(), t.jit_train_step()
            device = [to_global_batch(b, t.mesh) for b in batches]
            started = time.perf_counter()
            for b in device:  # compiles every shape
                state, metrics = step(state, b)
            jax.block_until_ready((state, metrics))
        runs[name] = {"trainer": t, "state": state, "step": step, "batches": device,
                      "warm_s": time.perf_counter() - started, "rounds": []}
        print(f"{name}: compiled and warmed in {runs[name]['warm_s']:.1f}s", flush=True)

    for _ in range(args.rounds):
        for name, r in runs.items():
            with r["trainer"].context():
                started = time.perf_counter()
                for b in r["batches"]:
                    r["state"], metrics = r["step"](r["state"], b)
                jax.block_until_ready((r["state"], metrics))
            r["rounds"].append((time.perf_counter() - started) / len(r["batches"]))

    step_s = {name: statistics.median(r["rounds"]) for name, r in runs.items()}
    plain = step_s[NO_DROPOUT]
    print(f"\n{'variant':16s} {'step ms':>9s} {'vs threefry2x32':>16s} {'dropout cost':>13s}")
    for name, s in step_s.items():
        extra = "" if name == NO_DROPOUT else f"{1000 * (s - plain):+.0f} ms"
        print(f"{name:16s} {1000 * s:9.1f} {step_s['threefry2x32'] / s:15.2f}x {extra:>13s}")
    print(json.dumps({"config": args.config, "steps": args.steps, "rounds": args.rounds,
                      "step_s": {k: round(v, 4) for k, v in step_s.items()},
                      "speedup_vs_threefry2x32": {k: round(step_s["threefry2x32"] / v, 3) for k, v in step_s.items()}}))


if __name__ == "__main__":
    main()
