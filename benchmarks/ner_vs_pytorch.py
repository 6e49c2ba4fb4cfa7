"""CoNLL-2003 NER fine-tuning of all-MiniLM-L6-v2, this project vs transformers + PyTorch, in one run, over seeds.

The same weights, steps, learning rate (the recipe's, 1e-4, unless --learning-rate) and schedule on both sides
(benchmarks/side_by_side.py says what they share), max length 128, each word tagged at its first subword, valid
entity F1 (seqeval) validated 4 times (best kept). Ours runs configs/finetune_ner_conll.py as it is: sentences
packed into rows of 128 tokens, about as many a step as PyTorch's 32 (--padded: batches of 32 padded to length
buckets). PyTorch pads each batch of 32 to its longest sentence (DataCollatorForTokenClassification), the Hugging
Face token-classification example's batching; words cut off by truncation count as "O" on both sides.

    CROSSWRITE_DATA=../shared/data python benchmarks/ner_vs_pytorch.py [--seeds 3] [--epochs 2] [--max-train N]

Prints each run, both sides' mean ± standard deviation of valid F1 and seconds, and their wall-clock ratio; the
last line is JSON.
"""

from __future__ import annotations

from pathlib import Path

import side_by_side as sbs

RECIPE = "finetune_ner_conll.py"
IGNORED = -100  # the label PyTorch's cross-entropy skips: subwords after a word's first, special tokens, padding


def first_subword_labels(word_ids: list, tags: list[str], tag_id: dict[str, int]) -> list[int]:
    """A label per subword: the word's tag id at its first subword, IGNORED elsewhere (the HF example's rule)."""
    labels, seen = [], set()
    for word in word_ids:
        first = word is not None and word not in seen
        labels.append(tag_id.get(tags[word], IGNORED) if first else IGNORED)
        seen.add(word)
    return labels


def word_predictions(word_ids: list, predicted_ids: list[int], words: int, tags: list[str]) -> list[str]:
    """A tag per word, from the prediction at its first subword; words cut off by truncation get "O"."""
    guess, seen = ["O"] * words, set()
    for position, word in enumerate(word_ids):
        if word is not None and word not in seen:
            guess[word] = tags[predicted_ids[position]]
            seen.add(word)
    return guess


def pytorch(data: Path, steps: int, max_train: int, eval_every: int, learning_rate: float, seed: int) -> dict:
    import time

    import torch
    from seqeval.metrics import f1_score
    from transformers import AutoTokenizer, BertForTokenClassification, DataCollatorForTokenClassification

    sbs.torch_threads()
    started = time.perf_counter()
    torch.manual_seed(seed)
    directory = sbs.minilm_directory()
    train_examples = sbs.examples(RECIPE, data, "train", max_train)
    valid_examples = sbs.examples(RECIPE, data, "valid")
    tags = sorted({tag for _, sentence_tags in train_examples for tag in sentence_tags})
    tag_id = {tag: i for i, tag in enumerate(tags)}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertForTokenClassification.from_pretrained(directory, num_labels=len(tags))
    collate = DataCollatorForTokenClassification(tokenizer)

    def encode(rows):
        encoded = tokenizer([list(words) for words, _ in rows], is_split_into_words=True, truncation=True,
                            max_length=128)
        return [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                 "labels": first_subword_labels(encoded.word_ids(i), sentence_tags, tag_id),
                 "word_ids": encoded.word_ids(i)} for i, (_, sentence_tags) in enumerate(rows)]

    train_rows = [{k: v for k, v in row.items() if k != "word_ids"} for row in encode(train_examples)]
    valid_rows = encode(valid_examples)

    def entity_f1() -> float:
        predicted = []
        for start in range(0, len(valid_rows), 128):
            chunk = valid_rows[start:start + 128]
            batch = collate([{k: v for k, v in row.items() if k != "word_ids"} for row in chunk])
            batch.pop("labels")
            ids = model(**batch).logits.argmax(-1).tolist()
            for row, row_ids, (words, _) in zip(chunk, ids, valid_examples[start:start + 128]):
                predicted.append(word_predictions(row["word_ids"], row_ids, len(words), tags))
        return 100.0 * f1_score([list(gold) for _, gold in valid_examples], predicted)

    return sbs.torch_finetune(model, train_rows, collate, seed=seed, steps=steps, learning_rate=learning_rate,
                              eval_every=eval_every, evaluate=entity_f1, started=started)


if __name__ == "__main__":
    sbs.main(__doc__, RECIPE, "ner_vs_pytorch", "f1", pytorch)
