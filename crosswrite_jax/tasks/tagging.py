"""Tagging: a label per word (predicted at its first subword), scored with seqeval's entity-level F1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from crosswrite_jax.tasks.base import HELD_OUT
from crosswrite_jax.tasks.labeling import LabelingTask, tag

OUTSIDE = "O"  # the tag of a word in no entity


@dataclass(frozen=True)
class Tagging(LabelingTask):
    def predicted_labels(self, batches: Sequence[dict[str, np.ndarray]], predictions: Sequence[np.ndarray],
                         examples: Sequence, labels: Sequence[str]) -> list:
        out: list = [None] * len(examples)
        for batch, ids in zip(batches, predictions):
            for index, tags in word_tags(np.asarray(ids), batch, examples, labels).items():
                out[index] = tags
        return out

    def scores(self, predicted: list, examples: Sequence) -> dict[str, Any]:
        from crosswrite_jax.metrics import entity_scores  # seqeval: on first use

        return entity_scores(predicted, [gold for _, gold in examples])

    def prediction_lines(self, examples: Sequence, predicted: list) -> list[str]:
        """A word per line, a blank line after each sentence (CoNLL)."""
        lines = []
        for (words, gold), guess in zip(examples, predicted):
            lines += [f"{word}\t{g}\t{p}\n" for word, g, p in zip(words, gold, guess)] + ["\n"]
        return lines


def word_tags(predicted_ids: np.ndarray, batch: dict[str, np.ndarray], examples: Sequence,
              labels: Sequence[str]) -> dict[int, list[str]]:
    """Example index -> the predicted tag of each of its words, read at each word's first subword.

    `predicted_ids` [b, W] are label ids for a tagging eval batch. Words cut off by truncation or with no subword
    get "O".
    """
    predicted = np.asarray(predicted_ids)
    word_index = batch["word_index"]
    if predicted.ndim != 2 or predicted.shape[0] < word_index.shape[0] or predicted.shape[1] < word_index.shape[1]:
        raise ValueError(f"predicted ids have shape {predicted.shape}, the batch's word_index {word_index.shape}")
    predicted = predicted[:word_index.shape[0], :word_index.shape[1]]
    out: dict[int, list[str]] = {}
    for r, example in enumerate(batch["example_index"].tolist()):
        if example < 0:
            continue
        tags = [OUTSIDE] * len(examples[example][0])
        positions = np.flatnonzero(word_index[r] >= 0)
        for w, label_id in zip(word_index[r, positions].tolist(), predicted[r, positions].tolist()):
            if not 0 <= label_id < len(labels):
                raise ValueError(f"predicted label id {label_id} is outside the {len(labels)} labels")
            tags[w] = labels[label_id]
        out[example] = tags
    return out


TASK = Tagging("tagging", "encoder", tag, ("inputs",), head="token_classification", per_word=True,
               metrics=HELD_OUT + ("precision", "recall", "f1"), example_fields=("tokens", "tags"),
               example_formats=("conll", "jsonl"), example_spec="conll:ner/wnut17/{split}.conll?tokens=0&tags=-1")
