"""Prompt -> response sequences for decoder-only fine-tuning (task sft), and the prompts a decoder generates from.

A pair becomes one token sequence: the prompt's last tokens, the response and EOS, with a mask of the prompt's
tokens (they carry no loss). Rows pack several sequences, told apart by segment ids and per-sequence positions, or
hold one each. A prompt takes at most data.max_source_length positions with the start token, a response with its
EOS data.max_target_length, so a row is their sum.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain
import numpy as np

from crosswrite_jax.data.pipeline import _Packed, _PackedBatches, pack
from crosswrite_jax.data.tokenizer import PAD_ID, Tokenizer
from crosswrite_jax.errors import UserError


def last_tokens(ids: list[int], prompt_length: int) -> list[int]:
    """The tokens of a prompt that fit `prompt_length` positions beside the start token: its last ones."""
    keep = prompt_length - 1
    return ids[-keep:] if keep > 0 else []


def prompt_batch(tokenizer: Tokenizer, prompts: Sequence[str], rows: int, prompt_length: int,
                 bucket_lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Decoder-only prompts [rows, width]: the start token (PAD) then each prompt's last tokens; and their padding
    (True at real tokens). The width is the smallest bucket that holds the longest, else one width for all."""
    ids_of = [[PAD_ID] + last_tokens(ids, prompt_length) for ids in tokenizer.encode_batch(list(prompts))]
    longest = max(len(p) for p in ids_of)
    buckets = [b for b in bucket_lengths if b >= longest]
    width = buckets[0] if buckets else max(longest, prompt_length)
    ids, padding = np.full((rows, width), PAD_ID, np.int32), np.zeros((rows, width), bool)
    for row, prompt in enumerate(ids_of):
        ids[row, :len(prompt)], padding[row, :len(prompt)] = prompt, True
    return ids, padding


def encode(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, prompt_length: int,
           response_length: int) -> tuple[_Packed, np.ndarray]:
    """The sequences of the (prompt, response) pairs with a non-empty response, and each one's prompt length."""
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    responses = tokenizer.encode_batch([r for _, r in pairs])
    kept = [(last_tokens(p, prompt_length), r[:response_length - 1]) for p, r in zip(prompts, responses) if r]
    sequences = _Packed([p + r for p, r in kept], prompt_length + response_length, tokenizer.eos_id)
    return sequences, np.array([len(p) for p, _ in kept], np.int32)


class PromptedBatches(_PackedBatches):
    """Maps a step k to this process's rows of global batch k: `targets`, `targets_prompt` (1 at prompt tokens)
    and, packed, `targets_segments` and `targets_positions`."""

    def __init__(self, sequences: _Packed, prompt_lengths: np.ndarray, **kwargs) -> None:
        super().__init__(sequences, sequences, **kwargs)
        self.prompt_lengths = prompt_lengths

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rows = self.local_rows(step)
        ids, segments, positions = pack(self.targets, rows, self.pad_id)
        prompt_of_segment = np.zeros((len(rows), max(map(len, rows), default=0) + 1), np.int32)
        for r, row in enumerate(rows):
            prompt_of_segment[r, 1:len(row) + 1] = self.prompt_lengths[row]
        prompt = (segments > 0) & (positions < np.take_along_axis(prompt_of_segment, segments, axis=1))
        batch = {"targets": ids, "targets_prompt": prompt.astype(np.int32)}
        if self.packing:
            batch.update(targets_segments=segments, targets_positions=positions)
        return batch


def train_dataset(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *, global_batch_size: int,
                  prompt_length: int, response_length: int, seed: int, packing: bool = True, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """Endless random-access dataset of prompt -> response rows (see PromptedBatches); `pairs` hold prompt texts."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"config key 'train.batch_size' ({global_batch_size}) must be a positive multiple of "
                        f"the process count ({process_count})")
    sequences, prompt_lengths = encode(pairs, tokenizer, prompt_length, response_length)
    batches = PromptedBatches(sequences, prompt_lengths, global_rows=global_batch_size, seed=seed,
                              process_index=process_index, process_count=process_count, pad_id=tokenizer.pad_id,
                              packing=packing)
    if not batches._plan(0):
        raise UserError(f"{len(prompt_lengths)} of {len(pairs)} pairs have a response and fill fewer rows than one "
                        f"batch of {global_batch_size}; lower train.batch_size or use a larger split")
    return grain.MapDataset.range(sys.maxsize).map(batches)
