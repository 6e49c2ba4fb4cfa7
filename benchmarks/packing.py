"""Padding with and without packing, per pretraining objective, on a recipe's real text.

    CROSSWRITE_DATA=../shared/data python benchmarks/packing.py [--batches 50] [--length 128]

For each objective, builds the recipe's training batches twice (packed rows; one example a row) with the
tokenizer of a finished run if given (--tokenizer DIR) or one trained on the fly, and prints the share of
row slots that hold no token, side by side, with the ratio. Prints a JSON line at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from crosswrite_jax import config as config_lib
from crosswrite_jax.data import pretraining, text_sources
from crosswrite_jax.data.tokenizer import Tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = {"mlm": "pretrain_mlm.py", "span_corruption": "pretrain_span_corruption.py",
           "causal_lm": "pretrain_causal_lm.py", "prefix_lm": "pretrain_causal_lm.py"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--data-dir", default=None, help="folder holding pretrain_text/ (default: $CROSSWRITE_DATA)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: train one, 8k BPE)")
    args = parser.parse_args()
    config = config_lib.load(CONFIGS / RECIPES["causal_lm"])
    sources = [text_sources.read_documents(spec, args.data_dir) for spec in config.data.sources]
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:
        started = time.perf_counter()
        sample = [doc for docs in sources for doc in docs[:5000]]
        tokenizer = Tokenizer.train(sample, 8000, "bpe", mask=True, sentinels=100)
        print(f"trained an 8k BPE tokenizer on {len(sample)} documents in {time.perf_counter() - started:.1f}s")
    results = {}
    print(f"{'objective':16s} {'row length':>10s} {'packed':>8s} {'unpacked':>9s} {'ratio':>6s}")
    for task, recipe in RECIPES.items():
        c = config_lib.override(config_lib.load(CONFIGS / recipe), {"task": task})
        fractions = []
        for packing in (True, False):
            ds = pretraining.pretraining_dataset(
                sources, tokenizer, task=task, objective=c.objective, vocab_size=c.model.vocab_size,
                global_batch_size=c.train.batch_size, inputs_length=c.data.max_source_length,
                targets_length=c.data.max_target_length, seed=0, weights=c.data.mixture_weights, packing=packing)
            fractions.append(pretraining.padding_fraction(list(itertools.islice(iter(ds), args.batches))))
        packed, unpacked = fractions
        results[task] = {"packed": round(packed, 4), "unpacked": round(unpacked, 4)}
        print(f"{task:16s} {c.data.max_source_length:10d} {packed:8.1%} {unpacked:9.1%} "
              f"{unpacked / max(packed, 1e-9):6.1f}x")
    print(json.dumps({"padding_fraction": results, "batches": args.batches}))


if __name__ == "__main__":
    main()
