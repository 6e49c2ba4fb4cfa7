"""The Task object: what varies by task (model family and head, batches, loss, metrics, predictions).

A task module builds one `Task` (or a subclass overriding its methods); tasks/__init__.py registers it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
from flax import linen as nn

from crosswrite_jax.config import PREFIX_LM_PREFILL_CHUNK
from crosswrite_jax.errors import UserError

Batch = dict[str, jax.Array]
Forward = Callable[[nn.Module, dict[str, Any], Batch, bool, dict[str, jax.Array]],
                   tuple[jax.Array, jax.Array, jax.Array]]

# Validation metrics where lower is better; every other metric a task reports is better higher.
LOWER_IS_BETTER = ("loss", "nll", "perplexity")
HELD_OUT = ("loss", "nll", "perplexity", "accuracy")  # what every teacher-forced validation reports


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
    pretraining: bool = False  # reads raw text (data.sources) rather than sentence pairs
    head: str = "none"  # the model.head it needs (encoder family)
    labeled: bool = False  # classification / tagging: data.examples with a label per example or per word
    per_word: bool = False  # labels words (tagging), not whole examples (classification)
    # Labeled examples (data/labeled.py): the two fields of one, the formats that hold them, and a sample spec.
    example_fields: tuple[str, ...] = ()
    example_formats: tuple[str, ...] = ()
    example_spec: str = ""
    generates: bool = False  # decodes text from a source (translation, summarization), scored in validation
    output_key: str = "text"  # the field predict writes the generated text under
    bidirectional_prompt: bool = False  # the prompt attends both ways (prefix LM): decoded in one prefill pass
    metrics: tuple[str, ...] = HELD_OUT  # what its validation reports
    other_families: tuple[str, ...] = ()  # further model families it can train (classification: decoders)
    prompted: bool = False  # trains a decoder on pairs, each its prompt then its target (sft; data/prompts.py)

    @property
    def vocabulary_outputs(self) -> bool:
        """Whether the loss is over vocabulary logits (decoders and the MLM head): what logits chunking splits."""
        return self.family != "encoder" or self.head == "mlm"

    @staticmethod
    def metric_direction(name: str) -> str:
        """'min' when a lower value of metric `name` is better, else 'max'."""
        return "min" if name in LOWER_IS_BETTER else "max"

    def check_model(self, model: Any, head_too: bool = False) -> None:
        """Fails when the model config's family (and, for training, its head) cannot serve this task."""
        if model.family not in (self.family, *self.other_families):
            raise UserError(f"task '{self.name}' trains a model.family='{self.family}' model, but the config has "
                            f"'{model.family}'; set --config.model.family={self.family} (or pick another task)")
        if head_too and self.head != "none" and model.head != self.head:
            raise UserError(f"task '{self.name}' needs model.head='{self.head}', but the config has '{model.head}'; "
                            f"set --config.model.head={self.head}")

    def check_config(self, config: Any, head_too: bool = False) -> None:
        """Fails when a run's config cannot serve this task: its model (check_model), logits chunking without
        vocabulary outputs, or a chunked prefill of a prompt that attends both ways."""
        self.check_model(config.model, head_too)
        if config.train.logits_chunk_length and not self.vocabulary_outputs:
            raise UserError(f"config key 'train.logits_chunk_length' chunks a decoder's or MLM head's vocabulary "
                            f"outputs; task '{self.name}' has none: set it to 0")
        if config.decode.prefill_chunk and self.bidirectional_prompt:
            raise UserError(PREFIX_LM_PREFILL_CHUNK)

    def prompts(self, config: Any, texts: list[str]) -> list[str]:
        """The texts a decoder-only model reads before it generates: the inputs as given."""
        return texts

    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        """The row length of each feature its training batches carry."""
        raise UserError(self.not_raw_text())

    def batch_shapes(self, data: Any) -> dict[str, tuple[int, ...]]:
        """The shape of one row of each feature of its widest training batch (all int32), as its pipeline makes
        them under `data` (the config's data.*): what compile-check compiles the train step for."""
        raise NotImplementedError

    def not_raw_text(self) -> str:
        """The error for reading raw text with a task that does not."""
        return (f"config key 'task' is {self.name!r}, which does not read raw text; use mlm, span_corruption, "
                f"denoising, causal_lm or prefix_lm with data.sources")


def with_segments(lengths: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Row shapes of packed features: each token row with its `_segments` and `_positions` (a prefix or prompt mask
    marks tokens of the targets row and has none of its own)."""
    shapes = {key: (length,) for key, length in lengths.items()}
    for key, length in lengths.items():
        if key not in ("targets_prefix", "targets_prompt"):
            shapes[f"{key}_segments"] = shapes[f"{key}_positions"] = (length,)
    return shapes
