"""SST-2 fine-tuning of all-MiniLM-L6-v2, this project vs transformers + PyTorch, in one run.

Both sides: the same weights, batch 32 drawn at random, max length 64, AdamW (the recipe's learning rate,
1e-4, unless --learning-rate; weight decay 0.01 on matrices), linear warmup over 10% of the steps then linear
decay, gradient clipping at 1, dropout 0.1, the same number of steps. Ours runs configs/finetune_sst2.py
(batches padded to length buckets 16/32/48/64, compile time included); PyTorch pads to the longest sentence
of each batch (DataCollatorWithPadding). Both report the best of 4 dev validations at the same steps.

    CROSSWRITE_DATA=../shared/data python benchmarks/sst2_vs_pytorch.py [--epochs 2] [--max-train N]

Prints both dev accuracies, wall-clock times and their ratio; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_tsv(path: Path, limit: int = 0) -> list[tuple[str, int]]:
    rows = [line.rsplit("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [(text, int(label)) for text, label in rows]
    return rows[:limit] if limit else rows


def ours(data: Path, steps: int, max_train: int, eval_every: int, learning_rate: float) -> dict:
    from crosswrite_jax import config as config_lib
    from crosswrite_jax.train import train

    config = config_lib.override(config_lib.load(ROOT / "configs" / "finetune_sst2.py"), {
        "data.data_dir": str(data), "train.steps": steps, "train.eval_every": eval_every,
        "train.progress_bar": False, "data.max_train_examples": max_train, "checkpoint.every": steps,
        "optimizer.warmup_steps": steps // 10, "optimizer.learning_rate": learning_rate})
    workdir = Path(tempfile.mkdtemp(prefix="sst2_ours_"))
    started = time.perf_counter()
    metrics = train(config, workdir)
    seconds = time.perf_counter() - started
    shutil.rmtree(workdir, ignore_errors=True)
    return {"accuracy": metrics["best_val_accuracy"], "final_accuracy": metrics["val_accuracy"], "seconds": seconds}


def pytorch(data: Path, steps: int, max_train: int, eval_every: int, learning_rate: float, seed: int = 0) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import (
        AutoTokenizer,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    sys.path.insert(0, str(ROOT / "configs"))
    import finetune_common

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    directory = finetune_common.minilm_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertForSequenceClassification.from_pretrained(directory, num_labels=2)
    collate = DataCollatorWithPadding(tokenizer)

    def encode(rows):
        encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=64)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]

    train_rows = encode(read_tsv(data / "sst2" / "train.tsv", max_train))
    dev_rows = encode(read_tsv(data / "sst2" / "dev.tsv"))
    loader = DataLoader(train_rows, batch_size=32, shuffle=True, collate_fn=collate, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)

    def accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in DataLoader(dev_rows, batch_size=128, collate_fn=collate):
                correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        model.train()
        return 100.0 * correct / len(dev_rows)

    started = time.perf_counter()
    model.train()
    step, best, last = 0, 0.0, 0.0
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % eval_every == 0 or step == steps:
                last = accuracy()
                best = max(best, last)
            if step == steps:
                break
    return {"accuracy": round(best, 2), "final_accuracy": round(last, 2), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CROSSWRITE_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-train", type=int, default=0, help="first N training sentences (0: all 6,920)")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="both sides (0: the recipe's)")
    args = parser.parse_args()
    from crosswrite_jax import config as config_lib

    learning_rate = args.learning_rate or config_lib.load(ROOT / "configs" / "finetune_sst2.py").optimizer.learning_rate
    data = Path(args.data)
    if not (data / "sst2" / "train.tsv").is_file():
        sys.exit(f"error: {data}/sst2/train.tsv not found; pass --data or set CROSSWRITE_DATA")
    examples = len(read_tsv(data / "sst2" / "train.tsv", args.max_train))
    steps = int(args.epochs * examples) // 32
    eval_every = max(steps // 4, 1)
    print(f"SST-2: {examples} training sentences, {steps} steps of 32 at learning rate {learning_rate:g}, dev "
          f"validated every {eval_every} steps", flush=True)
    a = ours(data, steps, args.max_train, eval_every, learning_rate)
    print(f"crosswrite_jax:         dev accuracy {a['accuracy']:.2f} (final {a['final_accuracy']:.2f}), "
          f"{a['seconds']:.0f} s", flush=True)
    b = pytorch(data, steps, args.max_train, eval_every, learning_rate)
    print(f"transformers + PyTorch: dev accuracy {b['accuracy']:.2f} (final {b['final_accuracy']:.2f}), "
          f"{b['seconds']:.0f} s", flush=True)
    ratio = b["seconds"] / a["seconds"]
    print(f"wall-clock speed-up of crosswrite_jax: {ratio:.2f}x", flush=True)
    print(json.dumps({"benchmark": "sst2_vs_pytorch", "steps": steps, "learning_rate": learning_rate,
                      "ours_accuracy": a["accuracy"],
                      "pytorch_accuracy": b["accuracy"], "ours_seconds": round(a["seconds"], 1),
                      "pytorch_seconds": round(b["seconds"], 1), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
