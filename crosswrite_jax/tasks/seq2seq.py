"""The base of the tasks that map a source text to a target text with an encoder-decoder (translation,
summarization): teacher-forced loss, greedy / beam decoding, scored on the decoded text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from crosswrite_jax.data.pipeline import widest_bucket
from crosswrite_jax.data.tokenizer import PAD_ID
from crosswrite_jax.tasks.base import Task, with_segments


def forward(model, variables, batch, deterministic, rngs, return_hidden=False):
    """Encoder-decoder teacher forcing: translation pairs or span-corrupted text."""
    keys = ("inputs", "targets", "inputs_segments", "inputs_positions", "targets_segments", "targets_positions")
    logits = model.apply(variables, **{k: batch[k] for k in keys if k in batch}, deterministic=deterministic,
                         rngs=rngs, return_hidden=return_hidden)
    return logits, batch["targets"], (batch["targets"] != PAD_ID).astype(jnp.float32)


@dataclass(frozen=True)
class Seq2SeqTask(Task):
    """Source text -> target text (pairs from data.train_split), decoded and scored on the decoded text."""

    family: str = "encoder_decoder"
    forward: Any = forward
    token_keys: tuple[str, ...] = ("inputs", "targets")
    generates: bool = True

    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"inputs": inputs_length, "targets": targets_length}

    def batch_shapes(self, data: Any) -> dict[str, tuple[int, ...]]:
        """Packed: rows of the maximum lengths with segments; else each side padded to its widest bucket."""
        lengths = self.batch_features(data.max_source_length, data.max_target_length)
        if data.packing:
            return with_segments(lengths)
        return {key: (widest_bucket(length, data.bucket_lengths),) for key, length in lengths.items()}

    def generation_scores(self, hypotheses: list[str], references: list[list[str]],
                          config: Any = None) -> dict[str, Any]:
        """The scores of decoded texts against their references (`config`: the run's, for tasks that choose)."""
        raise NotImplementedError
