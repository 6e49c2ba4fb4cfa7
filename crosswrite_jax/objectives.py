"""Pretraining corruptions of token-id arrays: BERT masking, T5 span corruption, prefix-LM splits.

Everything here is plain NumPy. Randomness comes only from the ``np.random.Generator`` the
caller passes in, so the same generator state always gives the same corruption.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from crosswrite_jax.data.tokenizer import PAD_ID
from crosswrite_jax.errors import UserError


def _require(condition: bool, message: str) -> None:
    """Raise UserError with the message unless the condition holds."""
    if not condition:
        raise UserError(message)


def _check_span_settings(noise_density: float, mean_noise_span_length: float) -> None:
    """Validate the two knobs shared by every span-corruption function."""
    _require(0.0 < noise_density < 1.0, f"noise_density must be in (0, 1), got {noise_density}")
    _require(mean_noise_span_length >= 1.0,
             f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")


def _check_integer_ids(ids: np.ndarray, name: str = "ids") -> None:
    """Reject arrays that do not hold integer token ids."""
    _require(np.issubdtype(ids.dtype, np.integer), f"{name} must hold integers, got dtype {ids.dtype}")


# ---------------------------------------------------------------------------------------------
# BERT masked language modelling
# ---------------------------------------------------------------------------------------------


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    mask_rate: float = 0.8,
    random_rate: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masked-LM corruption of ids of any shape: (inputs, targets with 0 off the chosen positions).

    Every id not in ``special_ids`` is chosen independently with ``probability``. A chosen id
    becomes ``mask_id`` with chance ``mask_rate``, a random ordinary id (never special, never
    ``mask_id``) with chance ``random_rate``, and stays as it is otherwise. ``targets`` holds the
    original id at chosen positions and the pad id 0 everywhere else.
    """
    ids = np.asarray(ids)
    _check_integer_ids(ids)
    _require(vocab_size > 0, f"vocab_size must be positive, got {vocab_size}")
    _require(0.0 <= probability <= 1.0, f"probability must be in [0, 1], got {probability}")
    _require(mask_rate >= 0.0, f"mask_rate must be >= 0, got {mask_rate}")
    _require(random_rate >= 0.0, f"random_rate must be >= 0, got {random_rate}")
    _require(mask_rate + random_rate <= 1.0,
             f"mask_rate + random_rate must be <= 1, got {mask_rate + random_rate}")
    _require(0 <= mask_id < vocab_size, f"mask_id must be in [0, vocab_size), got {mask_id}")

    replacements = _ordinary_ids(vocab_size, [*special_ids, mask_id])
    _require(random_rate == 0.0 or replacements.size > 0,
             "special_ids leave no ordinary id in [0, vocab_size) for random replacement")

    chosen = ~np.isin(ids, list(special_ids)) & (rng.random(ids.shape) < probability)
    action = rng.random(ids.shape)
    to_mask = chosen & (action < mask_rate)
    to_randomize = chosen & (action >= mask_rate) & (action < mask_rate + random_rate)

    inputs = ids.copy()
    inputs[to_mask] = mask_id
    picks = rng.integers(0, max(replacements.size, 1), int(to_randomize.sum()))
    inputs[to_randomize] = replacements[picks] if picks.size else picks
    targets = np.where(chosen, ids, PAD_ID).astype(ids.dtype)
    return inputs, targets


def _ordinary_ids(vocab_size: int, excluded: Sequence[int]) -> np.ndarray:
    """The ids in [0, vocab_size) that are not excluded, ascending."""
    return np.setdiff1d(np.arange(vocab_size), np.asarray(excluded, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# T5 span corruption
# ---------------------------------------------------------------------------------------------


def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """How many tokens and how many spans of a length-``length`` example are noise."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random way of writing ``total`` as an ordered sum of ``parts`` positive integers."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(
    length: int,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_noise_span_length: float,
) -> np.ndarray:
    """A boolean noise mask of ``length`` positions made of alternating clean and noise spans (T5).

    Noise tokens: round(length * noise_density), kept within [1, length - 1]. Noise spans:
    round(noise tokens / mean_noise_span_length), at least 1. Noise and clean tokens are each cut
    into that many non-empty spans at random; the mask starts with a clean span and ends with a
    noise span.
    """
    _require(length >= 2, f"length must be >= 2, got {length}")
    _check_span_settings(noise_density, mean_noise_span_length)
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_composition(num_noise, num_spans, rng)
    clean_lengths = _random_composition(length - num_noise, num_spans, rng)
    span_lengths = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), span_lengths)


def _spans_to_sentinels(ids: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Ids with each masked span collapsed into one sentinel, the k-th span getting sentinels[k]."""
    previous = np.concatenate([[False], mask[:-1]])
    span_starts = mask & ~previous
    span_index = np.cumsum(span_starts) - 1
    replaced = np.where(span_starts, sentinels[np.maximum(span_index, 0)], ids)
    return replaced[~mask | span_starts]


def span_corruption(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one 1-D example given without eos: (inputs, targets), both ending in eos.

    ``inputs`` keeps the clean tokens and puts one sentinel where each noise span was;
    ``targets`` lists every noise span after its sentinel. The k-th span uses sentinel_ids[k].
    Examples shorter than 2 tokens are left whole: inputs = ids + [eos], targets = [eos].
    The ids must not contain any sentinel, or the corruption cannot be undone.
    """
    ids = np.asarray(ids)
    _check_integer_ids(ids)
    _require(ids.ndim == 1, f"ids must be 1-D, got shape {ids.shape}")
    _check_span_settings(noise_density, mean_noise_span_length)
    sentinels = np.asarray(sentinel_ids, dtype=ids.dtype)
    _require(np.unique(sentinels).size == sentinels.size, "sentinel_ids must be distinct")
    eos = np.asarray([eos_id], dtype=ids.dtype)
    if ids.size < 2:
        return np.concatenate([ids, eos]), eos

    _, num_spans = _span_counts(ids.size, noise_density, mean_noise_span_length)
    _require(num_spans <= sentinels.size,
             f"sentinel_ids has {sentinels.size} ids but this example needs {num_spans} spans")
    mask = random_spans_noise_mask(ids.size, rng, noise_density=noise_density,
                                   mean_noise_span_length=mean_noise_span_length)
    inputs = _spans_to_sentinels(ids, mask, sentinels)
    targets = _spans_to_sentinels(ids, ~mask, sentinels)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def text_infilling(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    eos_id: int,
    noise_density: float = 0.35,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """BART / mBART text infilling of one 1-D example given without eos: (inputs, targets), both ending in eos.

    Noise spans (T5's random segmentation: ``noise_density`` of the tokens in spans of mean length
    ``mean_noise_span_length``) are each replaced by one ``mask_id`` in the inputs; the targets are the whole
    original text, so the decoder learns to write complete sentences of the input's language. Examples shorter
    than 2 tokens are left whole.
    """
    ids = np.asarray(ids)
    _check_integer_ids(ids)
    _require(ids.ndim == 1, f"ids must be 1-D, got shape {ids.shape}")
    _check_span_settings(noise_density, mean_noise_span_length)
    eos = np.asarray([eos_id], dtype=ids.dtype)
    targets = np.concatenate([ids, eos])
    if ids.size < 2:
        return targets, targets
    mask = random_spans_noise_mask(ids.size, rng, noise_density=noise_density,
                                   mean_noise_span_length=mean_noise_span_length)
    masks = np.full(int(mask.sum()), mask_id, dtype=ids.dtype)  # one per span at most: enough for any count
    return np.concatenate([_spans_to_sentinels(ids, mask, masks), eos]), targets


def _corrupted_lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """Lengths, eos included, of the inputs and targets span_corruption makes from tokens_length ids."""
    if tokens_length < 2:
        return tokens_length + 1, 1
    num_noise, num_spans = _span_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(
    inputs_length: int,
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[int, int]:
    """(tokens_length, targets_length): the most raw tokens whose corrupted inputs fit in inputs_length.

    Corrupting ``tokens_length`` ids always gives inputs of at most ``inputs_length`` ids (exactly
    that many unless the clean-span limit kicks in at very high noise densities) and targets of
    exactly ``targets_length`` ids, eos included, whatever the random generator.
    """
    _check_span_settings(noise_density, mean_noise_span_length)
    _require(inputs_length >= 3, f"inputs_length must be >= 3, got {inputs_length}")

    def fits(tokens_length: int) -> bool:
        return _corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)[0] <= inputs_length

    low, high = 2, 4
    while fits(high):  # inputs grow with tokens_length, so a bracketing search finds the largest fit
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, _corrupted_lengths(low, noise_density, mean_noise_span_length)[1]


def reconstruct_spans(
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
) -> np.ndarray:
    """The original ids, without eos, rebuilt from span_corruption's inputs and targets."""
    inputs, targets = _strip_eos(np.asarray(inputs), eos_id), _strip_eos(np.asarray(targets), eos_id)
    _check_integer_ids(inputs, "inputs")
    _check_integer_ids(targets, "targets")
    sentinels = list(sentinel_ids)

    target_starts = np.flatnonzero(np.isin(targets, sentinels))
    _require(target_starts.size == 0 or target_starts[0] == 0, "targets must start with a sentinel")
    spans = {int(targets[start]): targets[start + 1:end]
             for start, end in zip(target_starts, [*target_starts[1:], targets.size])}

    pieces = []
    for piece in np.split(inputs, np.flatnonzero(np.isin(inputs, sentinels))):
        if piece.size and int(piece[0]) in sentinels:
            _require(int(piece[0]) in spans, f"targets hold no span for sentinel {int(piece[0])}")
            pieces += [spans[int(piece[0])], piece[1:]]
        else:
            pieces.append(piece)
    return np.concatenate(pieces).astype(inputs.dtype) if pieces else inputs


def _strip_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """The ids without one trailing eos, if there is one."""
    return ids[:-1] if ids.size and ids[-1] == eos_id else ids


# ---------------------------------------------------------------------------------------------
# Prefix LM and diagnostics
# ---------------------------------------------------------------------------------------------


def prefix_split(length: int, rng: np.random.Generator, *, prefix_fraction: float = 0.5) -> int:
    """A random prefix length in [1, length - 1] averaging about prefix_fraction * length; 0 if length < 2.

    Draws uniformly from [1, round(2 * prefix_fraction * length)) and clips to [1, length - 1],
    so for prefix_fraction above 0.5 the clipping pulls the mean below prefix_fraction * length.
    """
    _require(0.0 < prefix_fraction < 1.0, f"prefix_fraction must be in (0, 1), got {prefix_fraction}")
    _require(length >= 0, f"length must be >= 0, got {length}")
    if length < 2:
        return 0
    prefix = int(rng.integers(1, max(2, round(2 * prefix_fraction * length))))
    return min(max(prefix, 1), length - 1)


def noise_statistics(masks: Iterable[np.ndarray]) -> dict[str, float]:
    """Measured noise density and mean noise-span length over boolean masks, pooled."""
    tokens = noise = spans = 0
    for mask in masks:
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        tokens += mask.size
        noise += int(mask.sum())
        spans += int(np.count_nonzero(mask & ~np.concatenate([[False], mask[:-1]])))
    return {
        "noise_density": noise / tokens if tokens else 0.0,
        "mean_noise_span_length": noise / spans if spans else 0.0,
        "num_tokens": float(tokens),
        "num_noise_spans": float(spans),
    }
