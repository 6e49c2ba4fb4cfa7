"""Forward+backward throughput of each model family at a small config (tokens/s), on the devices present.

    python benchmarks/families_throughput.py [--batch 16] [--length 128] [--steps 5]

Prints one line per family and a JSON line; the same configs serve the later side-by-side with PyTorch.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from crosswrite_jax.models import presets
from crosswrite_jax.models.transformer import build_model, example_inputs
from crosswrite_jax.state import strip_boxes

SIZES = dict(vocab_size=8192, d_model=256, num_heads=4, d_ff=1024, dropout_rate=0.0, max_length=512)
CONFIGS = {
    "bert (encoder, 4 layers)": presets.bert(num_encoder_layers=4, head="mlm", **SIZES),
    "t5 v1.1 (4+4 layers)": presets.t5("1.1", num_encoder_layers=4, num_decoder_layers=4, **SIZES),
    "llama (decoder, 4 layers)": presets.llama(num_decoder_layers=4, num_kv_heads=2, **SIZES),
}


def measure(config, batch: int, length: int, steps: int) -> dict:
    model = build_model(config)
    params = strip_boxes(model.init(jax.random.key(0), *example_inputs(config)))["params"]
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)), jnp.int32)
    inputs = (ids, ids) if config.family == "encoder_decoder" else (ids,)

    @jax.jit
    def step(p):
        def loss(p):
            logits = model.apply({"params": p}, *inputs)
            return jnp.mean(jax.nn.logsumexp(logits, -1))
        return jax.grad(loss)(p)

    started = time.perf_counter()
    jax.block_until_ready(step(params))
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - started)
    tokens = batch * length * len(inputs)
    median = float(np.median(times))
    return {"median_step_ms": round(1000 * median, 1), "tokens_per_s": round(tokens / median),
            "compile_s": round(compile_s, 1), "parameters": sum(int(x.size) for x in jax.tree.leaves(params))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for name, config in CONFIGS.items():
        results[name] = measure(config, args.batch, args.length, args.steps)
        print(f"{name:28s} {results[name]}", flush=True)
    print(json.dumps({"devices": [str(d) for d in jax.devices()][:1], "batch": args.batch, "length": args.length,
                      "results": results}))


if __name__ == "__main__":
    main()
