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

    `predicted_ids` [b, W] are label ids for a tagging eval batch (packed or not). Words cut off by truncation or
    with no subword get "O".
    """
    predicted = np.asarray(predicted_ids)
    word_index = batch["word_index"]
    if predicted.ndim != 2 or predicted.shape[0] < word_index.shape[0] or predicted.shape[1] < word_index.shape[1]:
        raise ValueError(f"predicted ids have shape {predicted.shape}, the batch's word_index {word_index.shape}")
    predicted = predicted[:word_index.shape[0], :word_index.shape[1]]
    example_of_token = token_examples(batch)
    out = {int(e): [OUTSIDE] * len(examples[e][0]) for e in np.unique(example_of_token) if e >= 0}
    at = np.flatnonzero((word_index >= 0) & (example_of_token >= 0))
    for e, w, label_id in zip(example_of_token.flat[at].tolist(), word_index.flat[at].tolist(),
                              predicted.flat[at].tolist()):
        if not 0 <= label_id < len(labels):
            raise ValueError(f"predicted label id {label_id} is outside the {len(labels)} labels")
        out[e][w] = labels[label_id]
    return out


def token_examples(batch: dict[str, np.ndarray]) -> np.ndarray:
    """[b, W]: the example index of every token of an eval batch (-1 on filler rows, and on padding when packed);
    packed batches hold an example per segment (`example_index` [b, K], `inputs_segments`), others one per row."""
    index = np.asarray(batch["example_index"])
    width = batch["word_index"].shape[1]
    if index.ndim == 1:
        return np.broadcast_to(index[:, None], (len(index), width))
    by_segment = np.concatenate([np.full((len(index), 1), -1, index.dtype), index], axis=1)
    return np.take_along_axis(by_segment, batch["inputs_segments"], axis=1)


TASK = Tagging("tagging", "encoder", tag, ("inputs",), head="token_classification", per_word=True,
               metrics=HELD_OUT + ("precision", "recall", "f1"), example_fields=("tokens", "tags"),
               example_formats=("conll", "jsonl"), example_spec="conll:ner/wnut17/{split}.conll?tokens=0&tags=-1")
