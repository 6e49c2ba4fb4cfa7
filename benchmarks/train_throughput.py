"""Training throughput of the quickstart model: bucketed padding vs packing, and dropout on vs off.

    python benchmarks/train_throughput.py [--steps 30]

Each variant trains on the bundled Multi30k sample in this one process; the script prints steady-state step
time (compile excluded), real (non-pad) and padded tokens/s, compile time for all shapes seen, and ratios
against the bucketed baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from crosswrite_jax import config as config_lib
from crosswrite_jax import sharding
from crosswrite_jax.batches import make_dataset
from crosswrite_jax.data.sources import read_parallel
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.models.transformer import PAD_ID
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.trainer import Trainer

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.py"


def measure(config, pairs, tokenizer, steps: int) -> dict:
    trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
    data = make_dataset(pairs, tokenizer, config, seed=0)
    state, step = trainer.init_state(), trainer.jit_train_step()
    shapes, compile_seconds, times, real, padded = set(), 0.0, [], 0, 0
    with trainer.context():
        for k in range(steps):
            local = data[k]
            shape = tuple(v.shape for v in local.values())
            started = time.perf_counter()
            state, metrics = step(state, to_global_batch(local, trainer.mesh))
            jax.block_until_ready(metrics)
            elapsed = time.perf_counter() - started
            if shape not in shapes:  # first call of a shape compiles
                shapes.add(shape)
                compile_seconds += elapsed
                continue
            times.append(elapsed)
            real += sum(int(np.count_nonzero(local[key] != PAD_ID)) for key in ("inputs", "targets"))
            padded += sum(int(local[key].size) for key in ("inputs", "targets"))
    total = sum(times)
    return {"median_step_ms": round(1000 * float(np.median(times)), 1), "real_tokens_per_s": round(real / total),
            "padded_tokens_per_s": round(padded / total), "shapes": len(shapes),
            "compile_s": round(compile_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    base = config_lib.load(QUICKSTART)
    pairs = read_parallel(base.data.dataset, "train", base.data.source_lang, base.data.target_lang)
    tokenizer = Tokenizer.train([s for p in pairs for s in p], base.model.vocab_size)
    variants = {
        "bucketed, 64 pairs": {"data.packing": False, "train.batch_size": 64,
                               "data.bucket_lengths": (16, 24, 32, 48, 64)},
        "packed, 16 rows of 64": {},
        "packed, dropout 0.1": {"model.dropout_rate": 0.1},
    }
    results = {}
    for name, overrides in variants.items():
        results[name] = measure(config_lib.override(base, overrides), pairs, tokenizer, args.steps)
        print(f"{name:24s} {results[name]}", flush=True)
    baseline = results["bucketed, 64 pairs"]["real_tokens_per_s"]
    ratios = {name: round(r["real_tokens_per_s"] / baseline, 2) for name, r in results.items()}
    print("real tokens/s relative to bucketed:", ratios)
    print(json.dumps({"devices": jax.device_count(), "results": results, "ratio_vs_bucketed": ratios}))


if __name__ == "__main__":
    main()
