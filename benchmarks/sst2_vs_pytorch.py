"""SST-2 fine-tuning of all-MiniLM-L6-v2, this project vs transformers + PyTorch, in one run, over seeds.

The same weights, steps, learning rate (the recipe's, 1e-4, unless --learning-rate) and schedule on both sides
(benchmarks/side_by_side.py says what they share), max length 64, dev accuracy validated 4 times (best kept).
Ours runs configs/finetune_sst2.py as it is: sentences packed into rows of 64 tokens, about as many a step as
PyTorch's 32 (--padded: batches of 32 padded to length buckets). PyTorch pads each batch of 32 to its longest
sentence (DataCollatorWithPadding), the Hugging Face text-classification example's batching.

    CROSSWRITE_DATA=../shared/data python benchmarks/sst2_vs_pytorch.py [--seeds 3] [--epochs 2] [--max-train N]

Prints each run, both sides' mean ± standard deviation of dev accuracy and seconds, and their wall-clock ratio;
the last line is JSON.
"""

from __future__ import annotations

from pathlib import Path

import side_by_side as sbs

RECIPE = "finetune_sst2.py"


def pytorch(data: Path, steps: int, max_train: int, eval_every: int, learning_rate: float, seed: int) -> dict:
    import time

    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

    sbs.torch_threads()
    started = time.perf_counter()
    torch.manual_seed(seed)
    directory = sbs.minilm_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertForSequenceClassification.from_pretrained(directory, num_labels=2)
    collate = DataCollatorWithPadding(tokenizer)

    def encode(rows):
        encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=64)
        return [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
                for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]

    train_rows = encode(sbs.examples(RECIPE, data, "train", max_train))
    dev_rows = encode(sbs.examples(RECIPE, data, "dev"))

    def accuracy() -> float:
        correct = 0
        for batch in DataLoader(dev_rows, batch_size=128, collate_fn=collate):
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        return 100.0 * correct / len(dev_rows)

    return sbs.torch_finetune(model, train_rows, collate, seed=seed, steps=steps, learning_rate=learning_rate,
                              eval_every=eval_every, evaluate=accuracy, started=started)


if __name__ == "__main__":
    sbs.main(__doc__, RECIPE, "sst2_vs_pytorch", "accuracy", pytorch)
