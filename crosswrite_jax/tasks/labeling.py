"""Classification and tagging: an encoder with a label head, scored on its argmax predictions.

Batches (crosswrite_jax/data/labeled.py): `inputs` [B, S] with `labels` [B] (classification) or `tags`
[B, S] (tagging: the label id at each word's first subword, -1 elsewhere); -1 marks what carries no loss.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _labeled(key: str):
    def forward(model, variables, batch, deterministic, rngs):
        logits = model.apply(variables, batch["inputs"], deterministic=deterministic, rngs=rngs)
        gold = batch[key]
        return logits, jnp.maximum(gold, 0), (gold >= 0).astype(jnp.float32)

    return forward


classify = _labeled("labels")
tag = _labeled("tags")


def make_predict_step(model, task=None) -> Callable[[Any, dict], jax.Array]:
    """`predict(params, batch) -> label ids` ([B] or [B, S]): the argmax of the task's logits, no dropout."""

    def predict(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], deterministic=True)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return predict


def predicted_labels(task_name: str, batches: Sequence[dict[str, np.ndarray]], predictions: Sequence[np.ndarray],
                     examples: Sequence, labels: Sequence[str]) -> list:
    """Per example, in order: its predicted label (classification) or its predicted tag per word (tagging)."""
    from crosswrite_jax.data.labeled import word_tags

    out: list = [None] * len(examples)
    for batch, ids in zip(batches, predictions):
        if task_name == "classification":
            for row, index in enumerate(batch["example_index"]):
                if index >= 0:
                    out[index] = labels[int(ids[row])]
        else:
            for index, tags in word_tags(np.asarray(ids), batch, examples, labels).items():
                out[index] = tags
    return out


def scores(task_name: str, predicted: list, examples: Sequence) -> dict[str, Any]:
    """Accuracy and macro-F1 (classification) or entity-level precision / recall / F1 with seqeval (tagging)."""
    from crosswrite_jax.metrics import classification_scores, entity_scores  # scikit-learn, seqeval: on first use

    references = [gold for _, gold in examples]
    if task_name == "classification":
        return classification_scores(predicted, references)
    return entity_scores(predicted, references)


# The metric each task's validation reports under these names, and which direction is better.
HIGHER_IS_BETTER = {"accuracy", "macro_f1", "f1", "precision", "recall", "bleu", "chrf", "rouge1", "rouge2",
                    "rougeL"}
