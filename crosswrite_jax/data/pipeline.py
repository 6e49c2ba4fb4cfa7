"""Batches of token ids: seeded, length-grouped, bucket-padded, random-access training and eval pipelines."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain
import numpy as np

from crosswrite_jax.data.tokenizer import PAD_ID, Tokenizer
from crosswrite_jax.errors import UserError


def _check_buckets(bucket_lengths: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in bucket_lengths)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2:
        raise UserError(f"config key 'data.bucket_lengths' is {tuple(bucket_lengths)}; "
                        f"it must be a non-empty increasing tuple of lengths >= 2")
    return buckets


class _Packed:
    """Token id rows stored flat (ids + offsets), each already truncated and ending with EOS."""

    def __init__(self, rows: list[list[int]], max_length: int, eos_id: int) -> None:
        self.width = max_length  # the longest row, EOS included
        rows = [row[:max_length - 1] + [eos_id] for row in rows]
        self.lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
        self.offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.ids = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(self.offsets[-1]))

    def pad(self, indices: np.ndarray, width: int, pad_id: int) -> np.ndarray:
        """Rows `indices` (-1: an all-pad row) as an int32 [len(indices), width] array."""
        out = np.full((len(indices), width), pad_id, dtype=np.int32)
        for r, i in enumerate(indices):
            if i >= 0:
                out[r, :self.lengths[i]] = self.ids[self.offsets[i]:self.offsets[i + 1]]
        return out


def _bucket(longest: int, buckets: tuple[int, ...]) -> int:
    return buckets[int(np.searchsorted(buckets, longest))]


def widest_bucket(max_length: int, bucket_lengths: Sequence[int]) -> int:
    """The width of the widest bucketed batch: the bucket of a row cut to min(max_length, the longest bucket)."""
    buckets = _check_buckets(bucket_lengths)
    return _bucket(min(max_length, buckets[-1]), buckets)


def segments_per_row(max_segments: int, row_length: int) -> int:
    """The most examples a packed labeled row holds: data.max_segments_per_row, or (0) half the row length."""
    return max_segments or max(1, row_length // 2)


def check_batching(bucket_lengths: Sequence[int], global_batch_size: int, window: int, process_index: int,
                   process_count: int) -> tuple[int, ...]:
    """The bucket lengths as a tuple, after checking them and how batches split over processes."""
    buckets = _check_buckets(bucket_lengths)
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"config key 'train.batch_size' ({global_batch_size}) must be a positive multiple of "
                        f"the process count ({process_count})")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is outside [0, {process_count})")
    if window < 1:
        raise UserError(f"config key 'data.length_grouping_window' must be >= 1, got {window}")
    return buckets


class LengthGroupedBatches:
    """Maps a step k to the process-local part of global batch k (picklable, epoch plan cached).

    Each epoch shuffles the examples, sorts every window of `window` batches by `lengths` (so a batch pads
    little) and shuffles the batches. Subclasses build a batch from the rows `local_rows` picks.
    """

    def __init__(self, lengths: np.ndarray, *, global_batch_size: int, buckets: tuple[int, ...], seed: int,
                 window: int, process_index: int, process_count: int, pad_id: int) -> None:
        self.lengths, self.buckets = lengths, buckets
        self.batch_size, self.seed, self.window, self.pad_id = global_batch_size, seed, window, pad_id
        self.local = global_batch_size // process_count
        self.start = process_index * self.local
        self.batches_per_epoch = len(self.lengths) // global_batch_size
        self._cache: tuple[int, np.ndarray] | None = None

    def plan(self, epoch: int) -> np.ndarray:
        """Example indices of every global batch of an epoch, [batches_per_epoch, global_batch_size]."""
        cached = self._cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng([epoch, self.seed & (2**64 - 1)])
        order = rng.permutation(len(self.lengths))
        span = self.window * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            if self.window > 1:
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            full = len(chunk) // self.batch_size * self.batch_size
            batches.append(chunk[:full].reshape(-1, self.batch_size))
        plan = np.concatenate(batches)[rng.permutation(self.batches_per_epoch)]
        self._cache = (epoch, plan)
        return plan

    def global_rows(self, step: int) -> np.ndarray:
        """Example indices of global batch `step`."""
        return self.plan(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    def local_rows(self, rows: np.ndarray) -> np.ndarray:
        """This process's share of a global batch's rows."""
        return rows[self.start:self.start + self.local]


class _TrainBatches(LengthGroupedBatches):
    """Translation pairs: inputs and targets, each padded to its own bucket."""

    def __init__(self, sources: _Packed, targets: _Packed, **kwargs) -> None:
        super().__init__(sources.lengths + targets.lengths, **kwargs)
        self.sources, self.targets = sources, targets

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rows = self.global_rows(step)
        source_width = _bucket(int(self.sources.lengths[rows].max()), self.buckets)
        target_width = _bucket(int(self.targets.lengths[rows].max()), self.buckets)
        local = self.local_rows(rows)
        return {"inputs": self.sources.pad(local, source_width, self.pad_id),
                "targets": self.targets.pad(local, target_width, self.pad_id)}


def train_dataset(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *, global_batch_size: int,
                  max_source_length: int, max_target_length: int, bucket_lengths: Sequence[int], seed: int,
                  length_grouping_window: int = 16, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """Endless random-access dataset: element k is this process's rows of global training batch k."""
    buckets = check_batching(bucket_lengths, global_batch_size, length_grouping_window, process_index,
                             process_count)
    source_ids = tokenizer.encode_batch([s for s, _ in pairs])
    target_ids = tokenizer.encode_batch([t for _, t in pairs])
    keep = [i for i, (s, t) in enumerate(zip(source_ids, target_ids)) if s and t]
    if len(keep) < global_batch_size:
        raise UserError(f"only {len(keep)} of {len(pairs)} pairs are non-empty on both sides, fewer than one "
                        f"batch of {global_batch_size}; lower train.batch_size or use a larger split")
    sources = _Packed([source_ids[i] for i in keep], min(max_source_length, buckets[-1]), tokenizer.eos_id)
    targets = _Packed([target_ids[i] for i in keep], min(max_target_length, buckets[-1]), tokenizer.eos_id)
    batches = _TrainBatches(sources, targets, global_batch_size=global_batch_size, buckets=buckets,
                            seed=seed, window=length_grouping_window, process_index=process_index,
                            process_count=process_count, pad_id=tokenizer.pad_id)
    return grain.MapDataset.range(sys.maxsize).map(batches)


def eval_batches(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *, batch_size: int,
                 max_source_length: int, bucket_lengths: Sequence[int],
                 max_target_length: int = 0) -> list[dict[str, np.ndarray]]:
    """In-order batches of every pair: `inputs`, `example_index` (-1 for filler rows), and `targets` if asked."""
    buckets = _check_buckets(bucket_lengths)
    if batch_size <= 0:
        raise UserError(f"config key 'eval.batch_size' must be positive, got {batch_size}")
    sides = [(_Packed(tokenizer.encode_batch([s for s, _ in pairs]), min(max_source_length, buckets[-1]),
                      tokenizer.eos_id), "inputs")]
    if max_target_length > 0:
        sides.append((_Packed(tokenizer.encode_batch([t for _, t in pairs]), min(max_target_length, buckets[-1]),
                              tokenizer.eos_id), "targets"))
    batches = []
    for start in range(0, len(pairs), batch_size):
        index = np.arange(start, start + batch_size, dtype=np.int32)
        index[index >= len(pairs)] = -1
        batch = {"example_index": index}
        for packed, key in sides:
            width = _bucket(int(packed.lengths[index[index >= 0]].max()), buckets)
            batch[key] = packed.pad(index, width, tokenizer.pad_id)
        batches.append(batch)
    return batches


def padding_fraction(ds: grain.MapDataset, num_batches: int, pad_id: int = PAD_ID) -> dict[str, float]:
    """Fraction of pad tokens in `inputs` and `targets` over the first num_batches elements."""
    pads = {"inputs": 0, "targets": 0}
    total = {"inputs": 0, "targets": 0}
    for k in range(num_batches):
        batch = ds[k]
        for key in pads:
            pads[key] += int((batch[key] == pad_id).sum())
            total[key] += batch[key].size
    return {key: pads[key] / max(total[key], 1) for key in pads}


def _pack_rows(order: np.ndarray, source_lengths: np.ndarray, target_lengths: np.ndarray, source_width: int,
               target_width: int, open_rows: int = 8, max_segments: int = 0) -> list[list[int]]:
    """Groups examples into rows whose summed lengths fit both widths (first fit over a few open rows), at most
    `max_segments` examples a row (0: no limit)."""
    rows: list[list[int]] = []
    current: list[list[int]] = []  # open rows, oldest first
    room: list[list[int]] = []  # [source room, target room] of each open row
    for i in order:
        s, t = int(source_lengths[i]), int(target_lengths[i])
        for row, free in zip(current, room):
            if s <= free[0] and t <= free[1] and not 0 < max_segments <= len(row):
                row.append(int(i))
                free[0] -= s
                free[1] -= t
                break
        else:
            if len(current) == open_rows:
                rows.append(current.pop(0))
                room.pop(0)
            current.append([int(i)])
            room.append([source_width - s, target_width - t])
    return rows + current


class _PackedBatches:
    """Maps a step k to the process-local rows of packed global batch k (epoch plans cached)."""

    def __init__(self, sources: _Packed, targets: _Packed, *, global_rows: int, seed: int, process_index: int,
                 process_count: int, pad_id: int, packing: bool = True, max_segments: int = 0) -> None:
        self.sources, self.targets, self.rows, self.seed, self.pad_id = sources, targets, global_rows, seed, pad_id
        self.packing = packing  # False: one example per row
        self.max_segments = max_segments  # > 0: at most this many examples a row
        self.local = global_rows // process_count
        self.start = process_index * self.local
        self._plans: list[list[list[list[int]]]] = []  # per epoch, per batch, per row: example indices

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        while len(self._plans) <= epoch:
            e = len(self._plans)
            rng = np.random.default_rng([e, self.seed & (2**64 - 1), 1])
            order = rng.permutation(len(self.sources.lengths))
            rows = (_pack_rows(order, self.sources.lengths, self.targets.lengths, self.sources.width,
                               self.targets.width, max_segments=self.max_segments)
                    if self.packing else [[int(i)] for i in order])
            rows = [rows[j] for j in rng.permutation(len(rows))]
            usable = len(rows) // self.rows * self.rows
            self._plans.append([rows[j:j + self.rows] for j in range(0, usable, self.rows)])
        return self._plans[epoch]

    def local_rows(self, step: int) -> list[list[int]]:
        """This process's rows of global batch `step`: the example indices each row packs."""
        epoch = 0
        while step >= len(self._plan(epoch)):
            step -= len(self._plan(epoch))
            epoch += 1
        return self._plan(epoch)[step][self.start:self.start + self.local]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rows = self.local_rows(step)
        out = {}
        for packed, key in ((self.sources, "inputs"), (self.targets, "targets")):
            out[key], out[f"{key}_segments"], out[f"{key}_positions"] = pack(packed, rows, self.pad_id)
        return out


def pack(packed: _Packed, rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, segment ids (1, 2, ... per example; 0 for padding) and per-example positions [len(rows), width] of
    rows that each hold the examples listed, one after another."""
    ids, segments, positions = (np.zeros((len(rows), packed.width), np.int32) for _ in range(3))
    ids[:] = pad_id
    for r, row in enumerate(rows):
        at = 0
        for segment, i in enumerate(row, start=1):
            n = int(packed.lengths[i])
            ids[r, at:at + n] = packed.ids[packed.offsets[i]:packed.offsets[i + 1]]
            segments[r, at:at + n] = segment
            positions[r, at:at + n] = np.arange(n)
            at += n
    return ids, segments, positions


def packed_train_dataset(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *, global_batch_size: int,
                         source_length: int, target_length: int, seed: int, process_index: int = 0,
                         process_count: int = 1) -> grain.MapDataset:
    """Endless random-access dataset of packed rows: several pairs per row, told apart by segment ids.

    Element k holds this process's rows of global batch k: `inputs`, `targets` [rows, length] and, for each,
    `*_segments` (1, 2, ... per pair; 0 for padding) and `*_positions` (restarting at 0 in every pair).
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"config key 'train.batch_size' ({global_batch_size}) must be a positive multiple of "
                        f"the process count ({process_count})")
    source_ids = tokenizer.encode_batch([s for s, _ in pairs])
    target_ids = tokenizer.encode_batch([t for _, t in pairs])
    keep = [i for i, (s, t) in enumerate(zip(source_ids, target_ids)) if s and t]
    sources = _Packed([source_ids[i] for i in keep], source_length, tokenizer.eos_id)
    targets = _Packed([target_ids[i] for i in keep], target_length, tokenizer.eos_id)
    batches = _PackedBatches(sources, targets, global_rows=global_batch_size, seed=seed,
                             process_index=process_index, process_count=process_count, pad_id=tokenizer.pad_id)
    if not batches._plan(0):
        raise UserError(f"{len(keep)} pairs pack into fewer rows than one batch of {global_batch_size}; "
                        f"lower train.batch_size or use a larger split")
    return grain.MapDataset.range(sys.maxsize).map(batches)
