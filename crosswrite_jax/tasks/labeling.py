"""The base of classification and tagging: an encoder with a label head, scored on its argmax predictions.

Batches (crosswrite_jax/data/labeled.py): `inputs` [B, S] with `labels` [B] (classification) or `tags`
[B, S] (tagging: the label id at each word's first subword, -1 elsewhere); -1 marks what carries no loss. Packed
rows (data.packing) add `inputs_segments` and `inputs_positions` [B, S], and classification's `labels` are then
[B, K]: one per segment of the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosswrite_jax.data.pipeline import segments_per_row, widest_bucket
from crosswrite_jax.tasks.base import Task, with_segments


def packed_inputs(batch: dict, per_segment_key: str = "") -> dict[str, Any]:
    """The model's keyword arguments for packed rows (none for unpacked ones): segment ids, positions and, when
    `batch[per_segment_key]` holds a label per segment ([B, K]), the K outputs per row to make."""
    if "inputs_segments" not in batch:
        return {}
    extra = {"inputs_segments": batch["inputs_segments"], "inputs_positions": batch["inputs_positions"]}
    if per_segment_key:
        extra["max_segments"] = batch[per_segment_key].shape[1]
    return extra


def _labeled(key: str, per_segment: bool):
    def forward(model, variables, batch, deterministic, rngs):
        logits = model.apply(variables, batch["inputs"], deterministic=deterministic, rngs=rngs,
                             **packed_inputs(batch, key if per_segment else ""))
        gold = batch[key]
        return logits, jnp.maximum(gold, 0), (gold >= 0).astype(jnp.float32)

    return forward


classify = _labeled("labels", per_segment=True)
tag = _labeled("tags", per_segment=False)


def make_predict_step(model, task=None) -> Callable[[Any, dict], jax.Array]:
    """`predict(params, batch) -> label ids` ([B] or [B, S]): the argmax of the task's logits, no dropout."""

    def predict(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], deterministic=True)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return predict


@dataclass(frozen=True)
class LabelingTask(Task):
    """An encoder with a label head over data.examples; its label vocabulary is data.labels."""

    labeled: bool = True

    def batch_shapes(self, data: Any) -> dict[str, tuple[int, ...]]:
        """`inputs` (with `tags` for tagging) padded to the widest bucket and `labels` [] per row; packed, rows of
        data.max_source_length with segments and a label per segment, [K]."""
        if not data.packing:
            width = widest_bucket(data.max_source_length, data.bucket_lengths)
            return {"inputs": (width,), **({"tags": (width,)} if self.per_word else {"labels": ()})}
        width = data.max_source_length
        labels = {"tags": (width,)} if self.per_word else {
            "labels": (segments_per_row(data.max_segments_per_row, width),)}
        return {**with_segments({"inputs": width}), **labels}

    def predicted_labels(self, batches: Sequence[dict[str, np.ndarray]], predictions: Sequence[np.ndarray],
                         examples: Sequence, labels: Sequence[str]) -> list:
        """Per example, in order: its predicted label (classification) or its predicted tag per word (tagging)."""
        raise NotImplementedError

    def scores(self, predicted: list, examples: Sequence) -> dict[str, Any]:
        """The scores of predicted labels against the examples' gold ones."""
        raise NotImplementedError

    def prediction_lines(self, examples: Sequence, predicted: list) -> list[str]:
        """The lines of a predictions file: text (or word), gold and predicted label, tab-separated."""
        raise NotImplementedError

