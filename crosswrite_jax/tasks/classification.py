"""Classification: one label per example (an encoder's pooled output, or a decoder's last real token), scored with
accuracy and macro-F1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from crosswrite_jax.tasks.base import HELD_OUT
from crosswrite_jax.tasks.labeling import LabelingTask, classify


@dataclass(frozen=True)
class Classification(LabelingTask):
    def predicted_labels(self, batches: Sequence[dict[str, np.ndarray]], predictions: Sequence[np.ndarray],
                         examples: Sequence, labels: Sequence[str]) -> list:
        out: list = [None] * len(examples)
        for batch, ids in zip(batches, predictions):  # a label per row [b], or per packed segment [b, K]
            index = np.asarray(batch["example_index"])
            for i, label_id in zip(index.ravel().tolist(), np.asarray(ids)[:len(index)].ravel().tolist()):
                if i >= 0:
                    out[i] = labels[label_id]
        return out

    def scores(self, predicted: list, examples: Sequence) -> dict[str, Any]:
        from crosswrite_jax.metrics import classification_scores  # scikit-learn: on first use

        return classification_scores(predicted, [gold for _, gold in examples])

    def prediction_lines(self, examples: Sequence, predicted: list) -> list[str]:
        return [f"{text}\t{gold}\t{guess}\n" for (text, gold), guess in zip(examples, predicted)]


TASK = Classification("classification", "encoder", classify, ("inputs",), head="classification",
                      metrics=HELD_OUT + ("macro_f1",), example_fields=("text", "label"),
                      example_formats=("tsv", "csv", "jsonl"), example_spec="tsv:sst2/{split}.tsv?text=0&label=1",
                      other_families=("decoder",))
