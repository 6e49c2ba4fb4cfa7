"""Seeded subsets of a split: the few-label training sets and the disjoint parts of a corpus built from them."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def permuted_positions(count: int, seed: int, start: int, stop: int) -> list[int]:
    """Positions start..stop-1 of a permutation of range(count) drawn with `seed`, in ascending order.

    The same (count, seed) always gives the same permutation, so disjoint ranges of it are disjoint subsets:
    e.g. a labeled set (0..N) and unlabeled text (N..count) cut from one corpus.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"range {start}:{stop} is not an ascending range")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(count)[start:stop])


def seeded_subset(items: Sequence[T], size: int, seed: int) -> list[T]:
    """`size` items drawn without replacement with `seed` (in their original order); all when size is 0."""
    if size <= 0 or size >= len(items):
        return list(items)
    return [items[i] for i in permuted_positions(len(items), seed, 0, size)]
