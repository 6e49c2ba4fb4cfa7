"""Pretraining corruptions: statistical and exact properties of masking, span corruption and prefix splits."""

from __future__ import annotations

import numpy as np
import pytest

from crosswrite_jax.errors import UserError
from crosswrite_jax.objectives import (
    mask_tokens,
    noise_statistics,
    prefix_split,
    random_spans_noise_mask,
    reconstruct_spans,
    span_corruption,
    span_corruption_lengths,
)

EOS_ID = 1
SENTINELS = list(range(1999, 1999 - 300, -1))  # T5-style descending ids, disjoint from the data ids
SPECIALS = (0, 1, 2, 3)  # pad, eos, unk, mask
MASK_ID = 3
VOCAB_SIZE = 64
SEEDS = (0, 1, 2)


def random_text(rng: np.random.Generator, length: int) -> np.ndarray:
    """Token ids in [10, 1000), never a sentinel."""
    return rng.integers(10, 1000, size=length).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# span corruption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.3, 5.0), (0.5, 1.0)])
def test_span_corruption_round_trips(seed, density, span):
    rng = np.random.default_rng(seed)
    for length in [0, 1, 2, 3, 5, *rng.integers(2, 600, size=200)]:
        ids = random_text(rng, int(length))
        inputs, targets = span_corruption(ids, rng, sentinel_ids=SENTINELS, eos_id=EOS_ID,
                                          noise_density=density, mean_noise_span_length=span)
        assert inputs.dtype == targets.dtype == ids.dtype
        assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
        rebuilt = reconstruct_spans(inputs, targets, sentinel_ids=SENTINELS, eos_id=EOS_ID)
        np.testing.assert_array_equal(rebuilt, ids)


def test_span_corruption_layout():
    rng = np.random.default_rng(7)
    ids = random_text(rng, 200)
    inputs, targets = span_corruption(ids, rng, sentinel_ids=SENTINELS, eos_id=EOS_ID)
    in_sentinels = inputs[np.isin(inputs, SENTINELS)]
    out_sentinels = targets[np.isin(targets, SENTINELS)]
    num_spans = round(round(200 * 0.15) / 3.0)
    np.testing.assert_array_equal(in_sentinels, SENTINELS[:num_spans])
    np.testing.assert_array_equal(out_sentinels, SENTINELS[:num_spans])
    assert targets[0] == SENTINELS[0]  # targets open with a sentinel
    assert inputs[0] == ids[0]  # the first token is never noise
    assert inputs[-2] == SENTINELS[num_spans - 1]  # the last token always is
    assert inputs.size + targets.size == ids.size + 2 * num_spans + 2


def test_short_examples_are_left_whole():
    rng = np.random.default_rng(0)
    for ids in (np.zeros(0, np.int32), np.array([42], np.int32)):
        inputs, targets = span_corruption(ids, rng, sentinel_ids=SENTINELS, eos_id=EOS_ID)
        np.testing.assert_array_equal(inputs, [*ids, EOS_ID])
        np.testing.assert_array_equal(targets, [EOS_ID])


@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.3, 5.0)])
def test_noise_mask_statistics(density, span):
    rng = np.random.default_rng(123)
    masks = [random_spans_noise_mask(int(n), rng, noise_density=density, mean_noise_span_length=span)
             for n in rng.integers(100, 513, size=3000)]
    stats = noise_statistics(masks)
    assert abs(stats["noise_density"] - density) < 0.01
    assert abs(stats["mean_noise_span_length"] - span) < 0.2
    # noise is spread over the whole example; the last tenth gets extra since the last token is always noise
    positions = np.concatenate([np.flatnonzero(m) / (m.size - 1) for m in masks])
    share_per_tenth = np.bincount(np.minimum((positions * 10).astype(int), 9), minlength=10) / positions.size
    assert share_per_tenth[:9].min() > 0.07 and share_per_tenth[:9].max() < 0.12
    assert share_per_tenth[9] < 0.2


def test_noise_mask_shape_and_counts():
    rng = np.random.default_rng(5)
    for length in range(2, 300):
        mask = random_spans_noise_mask(length, rng, noise_density=0.15, mean_noise_span_length=3.0)
        assert mask.dtype == bool and mask.shape == (length,)
        num_noise = min(max(round(length * 0.15), 1), length - 1)
        assert mask.sum() == num_noise
        assert not mask[0] and mask[-1]
        stats = noise_statistics([mask])
        assert stats["num_noise_spans"] == min(max(round(num_noise / 3.0), 1), num_noise, length - num_noise)


def test_noise_mask_spans_vary():
    rng = np.random.default_rng(9)
    masks = {random_spans_noise_mask(100, rng, noise_density=0.15, mean_noise_span_length=3.0).tobytes()
             for _ in range(50)}
    assert len(masks) == 50


@pytest.mark.parametrize("inputs_length", [32, 64, 100, 128, 512])
@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.3, 5.0)])
def test_span_corruption_lengths_are_exact(inputs_length, density, span):
    tokens_length, targets_length = span_corruption_lengths(
        inputs_length, noise_density=density, mean_noise_span_length=span)
    assert tokens_length > inputs_length  # corruption shortens the inputs
    for seed in range(6):
        rng = np.random.default_rng(seed)
        inputs, targets = span_corruption(random_text(rng, tokens_length), rng, sentinel_ids=SENTINELS,
                                          eos_id=EOS_ID, noise_density=density, mean_noise_span_length=span)
        assert (inputs.size, targets.size) == (inputs_length, targets_length)
    # one more raw token would no longer fit
    longer, _ = span_corruption(random_text(rng, tokens_length + 1), rng, sentinel_ids=SENTINELS,
                                eos_id=EOS_ID, noise_density=density, mean_noise_span_length=span)
    assert longer.size > inputs_length


def test_span_corruption_lengths_match_t5():
    assert span_corruption_lengths(512) == (568, 114)
    assert span_corruption_lengths(3) == (2, 3)


def test_span_corruption_lengths_never_overflow_small_or_dense():
    for inputs_length in range(3, 80):
        for density, span in [(0.15, 3.0), (0.5, 1.0), (0.9, 1.0), (0.05, 10.0)]:
            tokens_length, targets_length = span_corruption_lengths(
                inputs_length, noise_density=density, mean_noise_span_length=span)
            rng = np.random.default_rng(inputs_length)
            inputs, targets = span_corruption(random_text(rng, tokens_length), rng, sentinel_ids=SENTINELS,
                                              eos_id=EOS_ID, noise_density=density, mean_noise_span_length=span)
            assert inputs.size <= inputs_length and targets.size == targets_length


def test_span_corruption_is_deterministic_per_seed():
    ids = random_text(np.random.default_rng(0), 300)

    def corrupt(seed):
        return span_corruption(ids, np.random.default_rng(seed), sentinel_ids=SENTINELS, eos_id=EOS_ID)

    for a, b in zip(corrupt(11), corrupt(11)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(corrupt(11)[0], corrupt(12)[0])


# ---------------------------------------------------------------------------------------------
# BERT masking
# ---------------------------------------------------------------------------------------------


def masked_batch(seed: int, shape=(200, 512)):
    """A batch with specials sprinkled in, and its masked-LM corruption."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB_SIZE, size=shape).astype(np.int32)
    ids[rng.random(shape) < 0.1] = 0
    ids[:, -1] = EOS_ID
    ids[:, 0] = 2
    inputs, targets = mask_tokens(ids, np.random.default_rng(seed + 100), vocab_size=VOCAB_SIZE,
                                  mask_id=MASK_ID, special_ids=SPECIALS)
    return ids, inputs, targets


def test_mask_tokens_rates():
    ids, inputs, targets = masked_batch(0)
    candidates = ~np.isin(ids, SPECIALS)
    selected = targets != 0
    assert candidates.sum() > 80_000
    assert abs(selected.sum() / candidates.sum() - 0.15) < 0.01

    masked = selected & (inputs == MASK_ID)
    randomized = selected & (inputs != ids) & (inputs != MASK_ID)
    unchanged = selected & (inputs == ids)
    # a random draw equals the original with chance 1/(ordinary ids); allow for it in "kept"
    coincide = 1 / (VOCAB_SIZE - len(SPECIALS))
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(randomized.sum() / n - 0.1 * (1 - coincide)) < 0.02
    assert abs(unchanged.sum() / n - (0.1 + 0.1 * coincide)) < 0.02


def test_mask_tokens_respects_specials_and_pads_targets():
    ids, inputs, targets = masked_batch(1)
    special = np.isin(ids, SPECIALS)
    selected = targets != 0
    assert not (selected & special).any()
    np.testing.assert_array_equal(inputs[special], ids[special])
    np.testing.assert_array_equal(targets[selected], ids[selected])
    assert (targets[~selected] == 0).all()
    changed = inputs != ids
    assert not changed[~selected].any()
    replaced = inputs[selected & changed & (inputs != MASK_ID)]
    assert replaced.size > 0 and not np.isin(replaced, SPECIALS).any()
    assert replaced.min() >= 0 and replaced.max() < VOCAB_SIZE
    # random replacements cover the whole ordinary vocabulary
    assert np.unique(replaced).size == VOCAB_SIZE - len(SPECIALS)


def test_mask_tokens_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    for shape in [(37,), (3, 9), (2, 3, 4)]:
        ids = rng.integers(4, VOCAB_SIZE, size=shape).astype(np.int32)
        inputs, targets = mask_tokens(ids, rng, vocab_size=VOCAB_SIZE, mask_id=MASK_ID, special_ids=SPECIALS)
        assert inputs.shape == targets.shape == ids.shape
        assert inputs.dtype == targets.dtype == np.int32


def test_mask_tokens_extremes():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, VOCAB_SIZE, size=1000).astype(np.int32)
    inputs, targets = mask_tokens(ids, rng, vocab_size=VOCAB_SIZE, mask_id=MASK_ID, special_ids=SPECIALS,
                                  probability=1.0, mask_rate=1.0, random_rate=0.0)
    assert (inputs == MASK_ID).all()
    np.testing.assert_array_equal(targets, ids)
    inputs, targets = mask_tokens(ids, rng, vocab_size=VOCAB_SIZE, mask_id=MASK_ID, special_ids=SPECIALS,
                                  probability=0.0)
    np.testing.assert_array_equal(inputs, ids)
    assert (targets == 0).all()


def test_mask_tokens_is_deterministic_per_seed():
    _, inputs_a, targets_a = masked_batch(3, shape=(4, 64))
    _, inputs_b, targets_b = masked_batch(3, shape=(4, 64))
    np.testing.assert_array_equal(inputs_a, inputs_b)
    np.testing.assert_array_equal(targets_a, targets_b)
    ids = masked_batch(3, shape=(4, 64))[0]
    other, _ = mask_tokens(ids, np.random.default_rng(999), vocab_size=VOCAB_SIZE, mask_id=MASK_ID,
                           special_ids=SPECIALS)
    assert not np.array_equal(inputs_a, other)


# ---------------------------------------------------------------------------------------------
# prefix LM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_prefix_split_bounds_and_mean(fraction):
    rng = np.random.default_rng(4)
    for length in (2, 3, 10, 200):
        splits = np.array([prefix_split(length, rng, prefix_fraction=fraction) for _ in range(4000)])
        assert splits.min() >= 1 and splits.max() <= length - 1
        if length >= 10:
            assert abs(splits.mean() - fraction * length) < 0.05 * length


def test_prefix_split_short_and_deterministic():
    rng = np.random.default_rng(0)
    assert prefix_split(0, rng) == prefix_split(1, rng) == 0

    def draws(seed):
        seeded = np.random.default_rng(seed)
        return [prefix_split(100, seeded) for _ in range(20)]

    assert draws(8) == draws(8)
    assert draws(8) != draws(9)


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,name", [
    (lambda rng: span_corruption(random_text(rng, 500), rng, sentinel_ids=SENTINELS[:5], eos_id=EOS_ID),
     "sentinel_ids"),
    (lambda rng: span_corruption(random_text(rng, 50), rng, sentinel_ids=[5, 5, 6], eos_id=EOS_ID),
     "sentinel_ids"),
    (lambda rng: span_corruption(random_text(rng, 50), rng, sentinel_ids=SENTINELS, eos_id=EOS_ID,
                                 noise_density=0.0), "noise_density"),
    (lambda rng: span_corruption(random_text(rng, 50), rng, sentinel_ids=SENTINELS, eos_id=EOS_ID,
                                 noise_density=1.0), "noise_density"),
    (lambda rng: span_corruption(random_text(rng, 50), rng, sentinel_ids=SENTINELS, eos_id=EOS_ID,
                                 mean_noise_span_length=0.5), "mean_noise_span_length"),
    (lambda rng: span_corruption(random_text(rng, 50).reshape(5, 10), rng, sentinel_ids=SENTINELS,
                                 eos_id=EOS_ID), "ids"),
    (lambda rng: span_corruption(np.linspace(0, 1, 20), rng, sentinel_ids=SENTINELS, eos_id=EOS_ID), "ids"),
    (lambda rng: random_spans_noise_mask(1, rng, noise_density=0.15, mean_noise_span_length=3.0), "length"),
    (lambda rng: span_corruption_lengths(2), "inputs_length"),
    (lambda rng: span_corruption_lengths(64, noise_density=1.5), "noise_density"),
    (lambda rng: mask_tokens(random_text(rng, 10), rng, vocab_size=VOCAB_SIZE, mask_id=MASK_ID,
                             special_ids=SPECIALS, probability=1.2), "probability"),
    (lambda rng: mask_tokens(random_text(rng, 10), rng, vocab_size=VOCAB_SIZE, mask_id=MASK_ID,
                             special_ids=SPECIALS, mask_rate=0.9, random_rate=0.2), "mask_rate"),
    (lambda rng: mask_tokens(random_text(rng, 10), rng, vocab_size=VOCAB_SIZE, mask_id=MASK_ID,
                             special_ids=SPECIALS, random_rate=-0.1), "random_rate"),
    (lambda rng: mask_tokens(random_text(rng, 10), rng, vocab_size=VOCAB_SIZE, mask_id=VOCAB_SIZE,
                             special_ids=SPECIALS), "mask_id"),
    (lambda rng: mask_tokens(random_text(rng, 10), rng, vocab_size=4, mask_id=MASK_ID,
                             special_ids=SPECIALS), "special_ids"),
    (lambda rng: prefix_split(10, rng, prefix_fraction=1.0), "prefix_fraction"),
    (lambda rng: reconstruct_spans(np.array([10, SENTINELS[1], EOS_ID]), np.array([SENTINELS[0], 11, EOS_ID]),
                                   sentinel_ids=SENTINELS, eos_id=EOS_ID), "sentinel"),
])
def test_bad_arguments_raise_user_error(call, name):
    with pytest.raises(UserError, match=name):
        call(np.random.default_rng(0))


def test_text_infilling_replaces_each_noise_span_by_one_mask_and_targets_the_whole_text():
    from crosswrite_jax.objectives import text_infilling

    ids = np.arange(10, 70)
    inputs, targets = text_infilling(ids, np.random.default_rng(3), mask_id=4, eos_id=1, noise_density=0.35,
                                     mean_noise_span_length=3.0)
    np.testing.assert_array_equal(targets, np.append(ids, 1))
    assert inputs[-1] == 1 and 4 not in ids
    spans = int((inputs == 4).sum())
    kept = inputs[(inputs != 4)][:-1]
    assert spans == round(round(60 * 0.35) / 3.0)  # 21 noise tokens in 7 spans
    assert len(kept) == 60 - 21 and np.all(np.diff(kept) > 0)  # the clean tokens, in order
    assert not np.any((inputs[:-1] == 4) & (np.roll(inputs, -1)[:-1] == 4))  # one mask per span
    again, _ = text_infilling(ids, np.random.default_rng(3), mask_id=4, eos_id=1)
    np.testing.assert_array_equal(inputs, again)
    short_inputs, short_targets = text_infilling(np.array([7]), np.random.default_rng(0), mask_id=4, eos_id=1)
    np.testing.assert_array_equal(short_inputs, [7, 1])
    np.testing.assert_array_equal(short_targets, [7, 1])
