"""Tagging: a label per word (predicted at its first subword), scored with seqeval's entity-level F1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from crosswrite_jax.tasks.base import HELD_OUT
from crosswrite_jax.tasks.labeling import LabelingTask, tag


@dataclass(frozen=True)
class Tagging(LabelingTask):
    def predicted_labels(self, batches: Sequence[dict[str, np.ndarray]], predictions: Sequence[np.ndarray],
                         examples: Sequence, labels: Sequence[str]) -> list:
        from crosswrite_jax.data.labeled import word_tags

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


TASK = Tagging("tagging", "encoder", tag, ("inputs",), head="token_classification", per_word=True,
               metrics=HELD_OUT + ("precision", "recall", "f1"))
