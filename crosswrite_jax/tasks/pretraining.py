"""Pretraining tasks on raw text (data.sources): masked LM (encoder), span corruption and denoising
(encoder-decoder), causal and prefix LM (decoder). Each owns its batch features, the raw tokens a row takes, its
corruption of a chunk of tokens (crosswrite_jax/objectives.py) and the special tokens its tokenizer needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosswrite_jax import objectives
from crosswrite_jax.data.tokenizer import PAD_ID
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import shift_right
from crosswrite_jax.tasks import seq2seq
from crosswrite_jax.tasks.base import Task, with_segments


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


def language_model(model, variables, batch, deterministic, rngs, return_hidden=False):
    """Decoder predicting every token from the ones before (and, for a prefix LM, the whole prefix); tokens of a
    prefix or (sft) a prompt carry no loss."""
    targets = batch["targets"]
    positions = batch.get("targets_positions")
    kwargs = {"inputs_segments": batch.get("targets_segments"), "inputs_positions": positions}
    weights = targets != PAD_ID
    if "targets_prefix" in batch:
        kwargs["inputs_prefix"] = batch["targets_prefix"]
        weights = weights & (batch["targets_prefix"] == 0)
    if "targets_prompt" in batch:  # attended causally, like the rest
        weights = weights & (batch["targets_prompt"] == 0)
    logits = model.apply(variables, shift_right(targets, positions), deterministic=deterministic, rngs=rngs,
                         return_hidden=return_hidden, **{k: v for k, v in kwargs.items() if v is not None})
    return logits, targets, weights.astype(jnp.float32)


@dataclass(frozen=True)
class PretrainingTask(Task):
    """A self-supervised objective over chunks of raw text."""

    pretraining: bool = True

    def batch_shapes(self, data: Any) -> dict[str, tuple[int, ...]]:
        """Rows of the feature lengths, always with segments and positions (an unpacked row is one segment)."""
        return with_segments(self.batch_features(data.max_source_length, data.max_target_length))

    def chunk_length(self, inputs_length: int, targets_length: int, noise_density: float,
                     mean_noise_span_length: float) -> int:
        """Raw tokens per example, so that the example after corruption (and its EOS) fits the row."""
        return inputs_length - 1

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Fails when the tokenizer lacks the special tokens the objective needs."""

    def corrupt(self, ids: np.ndarray, rng: np.random.Generator, corruption: Any) -> dict[str, np.ndarray]:
        """One chunk -> the objective's example (1-D int32 arrays); `corruption` holds objective (the config's
        objective.*), vocab_size and the tokenizer's eos_id, mask_id, sentinel_ids and special_ids."""
        return {"targets": np.append(ids, corruption.eos_id).astype(np.int32)}


def _noise_spans(noise: Any, ids: np.ndarray, rng: np.random.Generator, corruption: Any,
                 **special: Any) -> dict[str, np.ndarray]:
    """An example of a span-noising objective (span corruption, text infilling) at objective.* density and span
    length; `special` holds the token ids it writes in place of a span."""
    o = corruption.objective
    inputs, targets = noise(ids, rng, eos_id=corruption.eos_id, noise_density=o.noise_density,
                            mean_noise_span_length=o.mean_noise_span_length, **special)
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


def _need_mask_token(task: str, tokenizer: Any) -> None:
    if tokenizer.mask_id is None:
        raise UserError(f"task '{task}' needs a tokenizer with a mask token; train one with `crosswrite tokenizer "
                        f"train` (it adds <mask>) or leave data.tokenizer empty")


@dataclass(frozen=True)
class SpanCorruption(PretrainingTask):
    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"inputs": inputs_length, "targets": targets_length}

    def chunk_length(self, inputs_length: int, targets_length: int, noise_density: float,
                     mean_noise_span_length: float) -> int:
        tokens, needed = objectives.span_corruption_lengths(inputs_length, noise_density=noise_density,
                                                            mean_noise_span_length=mean_noise_span_length)
        if needed > targets_length:
            raise UserError(f"span corruption of {inputs_length}-token inputs makes targets of {needed} tokens, "
                            f"more than data.max_target_length={targets_length}; raise it to {needed}")
        return tokens

    def check_tokenizer(self, tokenizer: Any) -> None:
        if not tokenizer.sentinel_ids:
            raise UserError("task 'span_corruption' needs sentinel tokens (<extra_id_0>, ...); train a tokenizer "
                            "with `crosswrite tokenizer train --sentinels 100` or leave data.tokenizer empty")

    def corrupt(self, ids: np.ndarray, rng: np.random.Generator, corruption: Any) -> dict[str, np.ndarray]:
        return _noise_spans(objectives.span_corruption, ids, rng, corruption, sentinel_ids=corruption.sentinel_ids)


@dataclass(frozen=True)
class Denoising(PretrainingTask):
    """BART / mBART text infilling: noise spans each become one mask token, and the decoder writes the whole
    original text. Trained on monolingual text of two languages, the decoder learns to write each of them."""

    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"inputs": inputs_length, "targets": targets_length}

    def chunk_length(self, inputs_length: int, targets_length: int, noise_density: float,
                     mean_noise_span_length: float) -> int:
        return min(inputs_length, targets_length) - 1  # infilling never lengthens the text; targets are it whole

    def check_tokenizer(self, tokenizer: Any) -> None:
        _need_mask_token(self.name, tokenizer)

    def corrupt(self, ids: np.ndarray, rng: np.random.Generator, corruption: Any) -> dict[str, np.ndarray]:
        return _noise_spans(objectives.text_infilling, ids, rng, corruption, mask_id=corruption.mask_id)


@dataclass(frozen=True)
class MaskedLM(PretrainingTask):
    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"inputs": inputs_length, "targets": inputs_length}

    def check_tokenizer(self, tokenizer: Any) -> None:
        _need_mask_token(self.name, tokenizer)

    def corrupt(self, ids: np.ndarray, rng: np.random.Generator, corruption: Any) -> dict[str, np.ndarray]:
        o, tokens = corruption.objective, np.append(ids, corruption.eos_id).astype(np.int32)
        inputs, targets = objectives.mask_tokens(
            tokens, rng, vocab_size=corruption.vocab_size, mask_id=corruption.mask_id,
            special_ids=corruption.special_ids, probability=o.mlm_probability, mask_rate=o.mask_token_rate,
            random_rate=o.random_token_rate)
        return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


@dataclass(frozen=True)
class CausalLM(PretrainingTask):
    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"targets": inputs_length}


@dataclass(frozen=True)
class PrefixLM(PretrainingTask):
    def batch_features(self, inputs_length: int, targets_length: int) -> dict[str, int]:
        return {"targets": inputs_length, "targets_prefix": inputs_length}

    def corrupt(self, ids: np.ndarray, rng: np.random.Generator, corruption: Any) -> dict[str, np.ndarray]:
        tokens = np.append(ids, corruption.eos_id).astype(np.int32)
        prefix = np.zeros_like(tokens)
        prefix[:objectives.prefix_split(len(tokens), rng, prefix_fraction=corruption.objective.prefix_fraction)] = 1
        return {"targets": tokens, "targets_prefix": prefix}


SPAN_CORRUPTION = SpanCorruption("span_corruption", "encoder_decoder", seq2seq.forward, ("inputs", "targets"))
DENOISING = Denoising("denoising", "encoder_decoder", seq2seq.forward, ("inputs", "targets"))
MLM = MaskedLM("mlm", "encoder", _masked_lm, ("inputs",), head="mlm")
CAUSAL_LM = CausalLM("causal_lm", "decoder", language_model, ("targets",))
PREFIX_LM = PrefixLM("prefix_lm", "decoder", language_model, ("targets",), bidirectional_prompt=True)
