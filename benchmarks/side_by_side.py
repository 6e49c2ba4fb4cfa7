"""Fine-tuning side by side, in one run: a recipe of this project against transformers + PyTorch on the same
weights, steps, learning rate and schedule, over seeds. The shared half of benchmarks/sst2_vs_pytorch.py and
benchmarks/ner_vs_pytorch.py.

Both sides: AdamW (weight decay 0.01 on matrices), linear warmup over 10% of the steps then linear decay,
gradient clipping at 1, dropout 0.1, validation at the same steps (the best kept), no early stopping. Each side's
clock runs from loading the weights and tokenizer to the last validation (ours includes compilation); imports
are outside both. Seeds alternate sides (ours, PyTorch, ours, ...) so that a change in load falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32  # sentences a PyTorch batch, as the Hugging Face examples


def arguments(description: str, epochs: float) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=os.environ.get("CROSSWRITE_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--epochs", type=float, default=epochs, help=f"of the training sentences (default {epochs:g})")
    parser.add_argument("--max-train", type=int, default=0, help="the first N training sentences (0: all)")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="both sides (0: the recipe's)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds a side (default 3)")
    parser.add_argument("--padded", action="store_true",
                        help="ours in padded batches of 32 (data.packing=false) instead of the recipe's packed rows")
    return parser.parse_args()


def minilm_directory() -> str:
    """The installed all-MiniLM-L6-v2 weights both sides start from (configs/finetune_common.py)."""
    if str(ROOT / "configs") not in sys.path:
        sys.path.insert(0, str(ROOT / "configs"))
    import finetune_common

    return finetune_common.minilm_directory()


def examples(recipe: str, data: Path, split: str, limit: int = 0) -> list:
    """The recipe's examples of `split` (the first `limit` when > 0), read as training reads them."""
    from crosswrite_jax import config as config_lib
    from crosswrite_jax.data import labeled
    from crosswrite_jax.errors import UserError
    from crosswrite_jax.tasks import get_task

    config = config_lib.load(ROOT / "configs" / recipe)
    try:
        return labeled.read_examples(get_task(config.task), config.data.examples, split, str(data), max_examples=limit)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def ours(recipe: str, data: Path, *, steps: int, eval_every: int, learning_rate: float, max_train: int, seed: int,
         metric: str, padded: bool) -> dict:
    """One fine-tuning run of configs/`recipe` for `steps` steps: the best validation `metric` and the seconds."""
    from crosswrite_jax import config as config_lib
    from crosswrite_jax.train import train

    overrides = {"data.data_dir": str(data), "train.steps": steps, "train.eval_every": eval_every,
                 "train.progress_bar": False, "data.max_train_examples": max_train, "checkpoint.every": steps,
                 "optimizer.warmup_steps": steps // 10, "optimizer.learning_rate": learning_rate,
                 "train.seed": seed, "train.eval_at_start": False, "train.early_stopping_patience": 0}
    if padded:
        overrides.update({"data.packing": False, "train.batch_size": BATCH})
    config = config_lib.override(config_lib.load(ROOT / "configs" / recipe), overrides)
    workdir = Path(tempfile.mkdtemp(prefix="side_by_side_"))
    started = time.perf_counter()
    metrics = train(config, workdir)
    seconds = time.perf_counter() - started
    shutil.rmtree(workdir, ignore_errors=True)
    return {"score": metrics[f"best_val_{metric}"], "final": metrics[f"val_{metric}"], "seconds": seconds}


def torch_finetune(model, train_rows: list[dict], collate: Callable, *, seed: int, steps: int, learning_rate: float,
                   eval_every: int, evaluate: Callable[[], float], started: float) -> dict:
    """transformers' training recipe by hand: AdamW, linear warmup and decay, clipping at 1, over batches of 32 of
    `train_rows` drawn at random (each epoch a new order); `evaluate` every `eval_every` steps and at the end."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    generator = torch.Generator().manual_seed(seed)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    model.train()
    step, best, last = 0, float("-inf"), float("-inf")
    while step < steps:
        for batch in DataLoader(train_rows, batch_size=BATCH, shuffle=True, collate_fn=collate, drop_last=True,
                                generator=generator):
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % eval_every == 0 or step == steps:
                model.eval()
                with torch.no_grad():
                    last = evaluate()
                model.train()
                best = max(best, last)
            if step == steps:
                break
    return {"score": round(best, 2), "final": round(last, 2), "seconds": time.perf_counter() - started}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _text(values: list[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def compare(name: str, metric: str, *, steps: int, learning_rate: float, examples_per_step: float, padded: bool,
            seeds: int, run_ours: Callable[[int], dict], run_pytorch: Callable[[int], dict]) -> dict:
    """Runs both sides `seeds` times, alternating, and prints each run, the means and the JSON line."""
    results: dict[str, list[dict]] = {"ours": [], "pytorch": []}
    for seed in range(seeds):
        for side, run in (("ours", run_ours), ("pytorch", run_pytorch)):
            result = run(seed)
            results[side].append(result)
            print(f"  seed {seed} {side:8s} {metric} {result['score']:.2f} (final {result['final']:.2f}), "
                  f"{result['seconds']:.0f} s", flush=True)
    summary = {"benchmark": name, "metric": metric, "steps": steps, "learning_rate": learning_rate,
               "seeds": seeds, "packing": not padded, "ours_examples_per_step": round(examples_per_step, 1),
               "pytorch_examples_per_step": BATCH}
    for side, runs in results.items():
        scores, seconds = [r["score"] for r in runs], [r["seconds"] for r in runs]
        summary[f"{side}_{metric}"] = [round(s, 2) for s in scores]
        summary[f"{side}_seconds"] = [round(s, 1) for s in seconds]
        print(f"{'crosswrite_jax' if side == 'ours' else 'transformers + PyTorch':24s}{metric} {_text(scores)}, "
              f"{_text(seconds, 0)} s", flush=True)
    ratio = statistics.mean(summary["pytorch_seconds"]) / statistics.mean(summary["ours_seconds"])
    summary["ratio"] = round(ratio, 3)
    print(f"wall-clock speed-up of crosswrite_jax (mean PyTorch seconds over ours): {ratio:.2f}x", flush=True)
    print(json.dumps(summary), flush=True)
    return summary


def torch_threads() -> None:
    """PyTorch on every core, as ours: XLA:CPU uses them all."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def examples_per_step(recipe: str, data: Path, max_train: int, padded: bool, batches: int = 50) -> float:
    """The mean number of sentences in one of ours' training batches (packed rows hold a varying number)."""
    if padded:
        return float(BATCH)
    import numpy as np

    from crosswrite_jax import config as config_lib
    from crosswrite_jax.data import labeled
    from crosswrite_jax.data.tokenizer import Tokenizer
    from crosswrite_jax.tasks import get_task

    config = config_lib.load(ROOT / "configs" / recipe)
    task, d = get_task(config.task), config.data
    train = examples(recipe, data, d.train_split, max_train)
    dataset = labeled.train_dataset(task, train, Tokenizer.load(config.train.init_from),
                                    labeled.label_vocabulary(task, train), global_batch_size=config.train.batch_size,
                                    max_length=d.max_source_length, bucket_lengths=d.bucket_lengths, seed=0,
                                    packing=True, max_segments=d.max_segments_per_row)
    counts = [sum(len(np.unique(row[row > 0])) for row in dataset[k]["inputs_segments"]) for k in range(batches)]
    return float(np.mean(counts))


def main(doc: str, recipe: str, name: str, metric: str, pytorch: Callable[..., dict]) -> dict:
    """A benchmark's command line: `pytorch(data, steps, max_train, eval_every, learning_rate, seed)` is its
    PyTorch side; ours is configs/`recipe`, scored on `metric` at the recipe's validation split."""
    args = arguments(doc.splitlines()[0], epochs=2.0)
    from crosswrite_jax import config as config_lib

    config = config_lib.load(ROOT / "configs" / recipe)
    learning_rate = args.learning_rate or config.optimizer.learning_rate
    data = Path(args.data)
    count = len(examples(recipe, data, config.data.train_split, args.max_train))
    steps = int(args.epochs * count) // BATCH
    eval_every = max(steps // 4, 1)
    per_step = examples_per_step(recipe, data, args.max_train, args.padded)
    print(f"{config.name}: {count} training sentences, {steps} steps at learning rate {learning_rate:g} (ours "
          f"{per_step:.1f} sentences a step, PyTorch {BATCH}), {config.data.eval_split} validated every "
          f"{eval_every} steps, {args.seeds} seeds a side", flush=True)
    return compare(name, metric, steps=steps, learning_rate=learning_rate, examples_per_step=per_step,
                   padded=args.padded, seeds=args.seeds,
                   run_ours=lambda seed: ours(recipe, data, steps=steps, eval_every=eval_every,
                                              learning_rate=learning_rate, max_train=args.max_train, seed=seed,
                                              metric=metric, padded=args.padded),
                   run_pytorch=lambda seed: pytorch(data, steps, args.max_train, eval_every, learning_rate, seed))
