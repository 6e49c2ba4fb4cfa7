"""Tasks: what a batch means to a model. Each task turns a batch into (logits, targets, loss weights).

The training and validation steps are task-agnostic: they call `task.forward` and sum token losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import PAD_ID, shift_right

Batch = dict[str, jax.Array]
Forward = Callable[[nn.Module, dict[str, Any], Batch, bool, dict[str, jax.Array]],
                   tuple[jax.Array, jax.Array, jax.Array]]


@dataclass(frozen=True)
class Task:
    """A training objective: which model family it needs, how a batch is fed, which tokens carry loss."""

    name: str
    family: str  # the model.family it trains
    # (model, variables, batch, deterministic, rngs) -> (logits, targets, weights); the forwards of the tasks with
    # vocabulary outputs (decoders and MLM) also take return_hidden=True: final states instead of logits, for
    # model.logits to project in chunks.
    forward: Forward
    token_keys: tuple[str, ...]  # batch entries whose non-pad tokens count as throughput
    pretraining: bool  # reads raw text (data.sources) rather than sentence pairs
    head: str = "none"  # the model.head it needs (encoder family)
    labeled: bool = False  # classification / tagging: data.examples with a label per example or per word

    @property
    def vocabulary_outputs(self) -> bool:
        """Whether the loss is over vocabulary logits (decoders and the MLM head): what logits chunking splits."""
        return self.family != "encoder" or self.head == "mlm"


def _seq2seq(model, variables, batch, deterministic, rngs, return_hidden=False):
    """Encoder-decoder teacher forcing: translation pairs or span-corrupted text."""
    keys = ("inputs", "targets", "inputs_segments", "inputs_positions", "targets_segments", "targets_positions")
    logits = model.apply(variables, **{k: batch[k] for k in keys if k in batch}, deterministic=deterministic,
                         rngs=rngs, return_hidden=return_hidden)
    return logits, batch["targets"], (batch["targets"] != PAD_ID).astype(jnp.float32)


def first_positions(chosen_BL: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """The first `count` positions of each row where `chosen_BL` holds, [B, count], and which of them are real."""
    length = chosen_BL.shape[1]
    earliest_first = jnp.where(chosen_BL, length - jax.lax.broadcasted_iota(jnp.int32, chosen_BL.shape, 1), 0)
    scores, positions = jax.lax.top_k(earliest_first, count)
    return positions, scores > 0


def _masked_lm(model, variables, batch, deterministic, rngs, return_hidden=False):
    """Encoder predicting the original token at each corrupted position (targets are pad elsewhere).

    With model.mlm_max_predictions = K, the head runs on the first K corrupted positions of each row only."""
    keys = ("inputs", "inputs_segments", "inputs_positions")
    kwargs = {k: batch[k] for k in keys if k in batch}
    targets = batch["targets"]
    cap = model.config.mlm_max_predictions
    if 0 < cap < targets.shape[1]:
        positions, real = first_positions(targets != PAD_ID, cap)
        targets = jnp.where(real, jnp.take_along_axis(targets, positions, axis=1), PAD_ID)
        kwargs["predict_positions"] = positions
    logits = model.apply(variables, **kwargs, deterministic=deterministic, rngs=rngs, return_hidden=return_hidden)
    return logits, targets, (targets != PAD_ID).astype(jnp.float32)


def _language_model(model, variables, batch, deterministic, rngs, return_hidden=False):
    """Decoder predicting every token from the ones before (and, for a prefix LM, the whole prefix)."""
    targets = batch["targets"]
    positions = batch.get("targets_positions")
    kwargs = {"inputs_segments": batch.get("targets_segments"), "inputs_positions": positions}
    weights = targets != PAD_ID
    if "targets_prefix" in batch:
        kwargs["inputs_prefix"] = batch["targets_prefix"]
        weights = weights & (batch["targets_prefix"] == 0)
    logits = model.apply(variables, shift_right(targets, positions), deterministic=deterministic, rngs=rngs,
                         return_hidden=return_hidden, **{k: v for k, v in kwargs.items() if v is not None})
    return logits, targets, weights.astype(jnp.float32)


from crosswrite_jax.tasks import labeling  # noqa: E402  (after the shared pieces it builds on)

TASKS = {
    "translation": Task("translation", "encoder_decoder", _seq2seq, ("inputs", "targets"), pretraining=False),
    "summarization": Task("summarization", "encoder_decoder", _seq2seq, ("inputs", "targets"), pretraining=False),
    "classification": Task("classification", "encoder", labeling.classify, ("inputs",), pretraining=False,
                           head="classification", labeled=True),
    "tagging": Task("tagging", "encoder", labeling.tag, ("inputs",), pretraining=False, head="token_classification",
                    labeled=True),
    "span_corruption": Task("span_corruption", "encoder_decoder", _seq2seq, ("inputs", "targets"), pretraining=True),
    "mlm": Task("mlm", "encoder", _masked_lm, ("inputs",), pretraining=True, head="mlm"),
    "causal_lm": Task("causal_lm", "decoder", _language_model, ("targets",), pretraining=True),
    "prefix_lm": Task("prefix_lm", "decoder", _language_model, ("targets",), pretraining=True),
}


def get_task(name: str) -> Task:
    """The task called `name`."""
    if name not in TASKS:
        raise UserError(f"config key 'task' is {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
