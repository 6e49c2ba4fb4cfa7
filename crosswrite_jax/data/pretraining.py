"""Pretraining batches from raw text: tokenize, chunk, corrupt (per objective), pack, batch; resumable.

The pipeline is a grain dataset: documents -> process shard -> per-epoch shuffle -> tokens -> weighted
mixture of sources -> chunks that fit a row -> the objective's corruption (seeded per element) -> first-fit
packing into rows with segment ids and positions -> batches. Its iterator's state is small JSON, saved in
every checkpoint, so a restarted run reads exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.errors import UserError

if TYPE_CHECKING:
    from crosswrite_jax.tasks import Task

SEGMENT_SUFFIXES = (("_segment_ids", "_segments"), ("_positions", "_positions"))


def _task(task: "str | Task") -> "Task":
    """The Task itself, or the one registered under that name."""
    from crosswrite_jax.tasks import get_task

    return get_task(task) if isinstance(task, str) else task


def features(task: "str | Task", inputs_length: int, targets_length: int) -> dict[str, int]:
    """The packed row length of each feature a task's batches carry."""
    return _task(task).batch_features(inputs_length, targets_length)


def chunk_length(task: "str | Task", inputs_length: int, targets_length: int, noise_density: float,
                 mean_noise_span_length: float) -> int:
    """Raw tokens per example, so that the example after corruption (and its EOS) fits the row."""
    return _task(task).chunk_length(inputs_length, targets_length, noise_density, mean_noise_span_length)


class _Chunk(grain.experimental.FlatMapTransform):
    """A tokenized document -> consecutive pieces of at most `length` tokens."""

    def __init__(self, length: int, longest_document: int):
        self.length = length
        self.max_fan_out = max(1, math.ceil(longest_document / length))

    def flat_map(self, ids: np.ndarray) -> list[np.ndarray]:
        return [ids[start:start + self.length] for start in range(0, len(ids), self.length)]


class _Corrupt(grain.transforms.RandomMap):
    """One chunk -> the objective's example (a dict of 1-D int32 arrays), seeded per element."""

    def __init__(self, task: Task, tokenizer: Tokenizer, objective: Any, vocab_size: int):
        self.task, self.objective, self.vocab_size = task, objective, vocab_size
        self.eos_id, self.mask_id = tokenizer.eos_id, tokenizer.mask_id
        self.sentinel_ids = tokenizer.sentinel_ids
        self.special_ids = sorted({tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id or 0,
                                   *(i for i in [tokenizer.mask_id] if i is not None), *tokenizer.sentinel_ids})

    def random_map(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.task.corrupt(ids, rng, self)


def _rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packing names (`x_segment_ids`) -> the model's (`x_segments`); drops the prefix's own."""
    out = {}
    for key, value in batch.items():
        if key.startswith("targets_prefix_"):
            continue
        for old, new in SEGMENT_SUFFIXES:
            if key.endswith(old):
                key = key[:-len(old)] + new
                break
        out[key] = value
    return out


def tokenized_source(documents: Sequence[str], tokenizer: Tokenizer, *, seed: int, shuffle: bool,
                     process_index: int, process_count: int) -> grain.MapDataset:
    """This process's documents as token-id arrays; shuffled anew every epoch and endless when `shuffle`."""
    ds = grain.MapDataset.source(documents)
    if process_count > 1:
        if len(documents) < process_count:
            raise UserError(f"a source has {len(documents)} documents, fewer than the {process_count} processes")
        ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed).repeat()
    return ds.map(lambda text: np.asarray(tokenizer.encode_batch([text])[0], dtype=np.int32))


def pretraining_dataset(sources: Sequence[Sequence[str]], tokenizer: Tokenizer, *, task: str | Task, objective: Any,
                        vocab_size: int, global_batch_size: int, inputs_length: int, targets_length: int,
                        seed: int, weights: Sequence[float] = (), shuffle: bool = True, packing: bool = True,
                        process_index: int = 0, process_count: int = 1,
                        longest_document: int = 1 << 20) -> grain.IterDataset:
    """Batches of corrupted text for `task`: this process's rows of each global batch.

    With `shuffle`, an endless weighted mixture of the sources, reshuffled each epoch; without, one in-order
    pass over the concatenated sources (for validation), the last batch filled with empty rows. With
    `packing`, several examples share a row (segment ids 1, 2, ...); without, each has a row of its own.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"config key 'train.batch_size' ({global_batch_size}) must be a positive multiple of "
                        f"the process count ({process_count})")
    task = _task(task)
    if not task.pretraining:
        raise UserError(task.not_raw_text())
    lengths = task.batch_features(inputs_length, targets_length)
    task.check_tokenizer(tokenizer)
    per_source = [tokenized_source(docs, tokenizer, seed=seed + 7919 * i, shuffle=shuffle,
                                   process_index=process_index, process_count=process_count)
                  for i, docs in enumerate(sources)]
    if shuffle:
        mixed = grain.MapDataset.mix(per_source, list(weights) or None) if len(per_source) > 1 else per_source[0]
    else:
        mixed = grain.MapDataset.concatenate(per_source) if len(per_source) > 1 else per_source[0]
    size = task.chunk_length(inputs_length, targets_length, objective.noise_density, objective.mean_noise_span_length)
    ds = grain.experimental.FlatMapIterDataset(mixed.to_iter_dataset(), _Chunk(size, longest_document))
    ds = ds.filter(lambda ids: len(ids) > 0)
    ds = ds.random_map(_Corrupt(task, tokenizer, objective, vocab_size), seed=seed)
    if packing:
        ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=8,
                                                        seed=seed, shuffle_bins=shuffle)
    else:
        ds = ds.map(lambda example: _alone(example, lengths))
    local = global_batch_size // process_count
    return ds.batch(local, drop_remainder=False, batch_fn=lambda rows: _stack(rows, local)).map(_rename)


def _alone(example: dict[str, np.ndarray], lengths: dict[str, int]) -> dict[str, np.ndarray]:
    """One example padded to a row of its own, with the segment ids and positions packing would give."""
    out = {}
    for key, length in lengths.items():
        value = example[key][:length]
        row = np.zeros(length, np.int32)
        row[:len(value)] = value
        out[key] = row
        out[f"{key}_segment_ids"] = (np.arange(length) < len(value)).astype(np.int32)
        out[f"{key}_positions"] = np.where(np.arange(length) < len(value), np.arange(length), 0).astype(np.int32)
    return out


def _stack(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch, appending all-zero (empty) rows to fill a short last batch."""
    out = {}
    for key in rows[0]:
        stacked = np.stack([row[key] for row in rows])
        if len(rows) < batch_size:
            stacked = np.concatenate([stacked, np.zeros((batch_size - len(rows),) + stacked.shape[1:],
                                                        stacked.dtype)])
        out[key] = stacked
    return out


def padding_fraction(batches: Sequence[dict[str, np.ndarray]]) -> float:
    """Share of row slots holding no token (segment 0), over every packed feature of the batches."""
    keys = [k for k in batches[0] if k.endswith("_segments")]
    empty = sum(int((b[k] == 0).sum()) for b in batches for k in keys)
    return empty / max(sum(b[k].size for b in batches for k in keys), 1)
