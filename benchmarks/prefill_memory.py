"""Long-prompt decoding with the prompt prefilled in one pass against `decode.prefill_chunk` chunks: compiled
temporaries (what XLA allocates besides parameters, inputs and outputs) and seconds per call, greedy.

    JAX_PLATFORMS=cpu python benchmarks/prefill_memory.py [--prompt 2048] [--batch 4] [--new-tokens 8]
        [--chunks 0,512,256] [--repeats 2]

The model is a randomly initialized small Llama (d_model 512, 8 layers, 8 query and 4 key/value heads, d_ff
1,376, vocabulary 32,000), as in decode_throughput.py. Every chunk size must give the same ids (checked).
Prints a table and a JSON line. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from crosswrite_jax.config import DecodeConfig
from crosswrite_jax.decode import generate
from crosswrite_jax.models.presets import llama
from crosswrite_jax.models.transformer import build_model

EOS = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens per row")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--chunks", default="0,512,256", help="prefill chunk sizes to compare (0: one pass)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = llama(vocab_size=32000, d_model=512, num_heads=8, num_kv_heads=4, d_ff=1376, num_decoder_layers=8,
                   max_length=args.prompt + args.new_tokens)
    model = build_model(config)
    prompts = np.random.default_rng(0).integers(3, 32000, (args.batch, args.prompt)).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), prompts[:, :8])["params"]
    print(f"small Llama, prompt {args.prompt} x {args.batch} rows, {args.new_tokens} new tokens, greedy; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'prefill':>10s} {'temp MiB':>9s} {'s per call':>10s} {'compile s':>9s} {'same ids':>8s}")
    results, reference = {}, None
    for chunk in (int(c) for c in args.chunks.split(",")):
        run = jax.jit(lambda p, x, chunk=chunk: generate(model, p, x, args.new_tokens, EOS,
                                                         DecodeConfig(prefill_chunk=chunk)))
        started = time.perf_counter()
        compiled = run.lower(params, prompts).compile()
        compile_s = time.perf_counter() - started
        temp = compiled.memory_analysis().temp_size_in_bytes
        ids = np.asarray(compiled(params, prompts))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            ids = np.asarray(compiled(params, prompts))
            times.append(time.perf_counter() - started)
        reference = ids if reference is None else reference
        same = bool((ids == reference).all())
        name = "one pass" if chunk == 0 else f"{chunk}"
        results[name] = {"temp_bytes": temp, "seconds": round(float(np.median(times)), 3),
                         "compile_s": round(compile_s, 1), "same_ids": same}
        print(f"{name:>10s} {temp / 2**20:9.0f} {np.median(times):10.3f} {compile_s:9.1f} {str(same):>8s}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
