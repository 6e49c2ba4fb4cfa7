"""Prediction from a checkpoint: one output line per input line, in order and flushed per batch: a translation
or summary, a continuation (decoder-only runs), a label (classification) or a tag per word (tagging)."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import jax
import numpy as np
from jax.experimental import multihost_utils

from crosswrite_jax.data import pipeline
from crosswrite_jax.decode import describe
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import Restored, global_batch, padded_batch_size, restore
from crosswrite_jax.models.transformer import PAD_ID

log = logging.getLogger("crosswrite")


def batches_of(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of at most `size` lines, newline characters removed."""
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, size)):
        yield [line.rstrip("\r\n") for line in chunk]


def source_batch(restored: Restored, lines: list[str], rows: int) -> np.ndarray:
    """Encoder inputs [rows, width] for the lines (with EOS, bucketed), filler rows all PAD."""
    c = restored.run.config
    batch, = pipeline.eval_batches([(line, "") for line in lines], restored.run.tokenizer, batch_size=rows,
                                   max_source_length=c.data.max_source_length, bucket_lengths=c.data.bucket_lengths)
    return batch["inputs"]


def prompt_batch(restored: Restored, lines: list[str], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoder-only prompts [rows, width]: the start token (PAD) then each line's last tokens; and their padding."""
    c = restored.run.config
    keep = c.data.max_source_length - 1
    prompts = [[PAD_ID] + (ids[-keep:] if keep > 0 else []) for ids in restored.run.tokenizer.encode_batch(lines)]
    longest = max(len(p) for p in prompts)
    buckets = [b for b in c.data.bucket_lengths if b >= longest]
    width = buckets[0] if buckets else longest
    ids, padding = np.full((rows, width), PAD_ID, np.int32), np.zeros((rows, width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], padding[row, :len(prompt)] = prompt, True
    return ids, padding


def predict_lines(restored: Restored, lines: Iterable[str], out: TextIO) -> int:
    """Writes one output line per input line, in order, flushing after each batch; returns the line count."""
    c, tokenizer = restored.run.config, restored.run.tokenizer
    rows = padded_batch_size(restored, c.eval.batch_size)
    decode = restored.decoder(c.eval.max_decode_length)
    rng = jax.random.key(c.decode.seed)
    written = 0
    with restored.context():
        for number, chunk in enumerate(batches_of(lines, rows)):
            if restored.model.config.family == "decoder":
                ids, padding = prompt_batch(restored, chunk, rows)
                padding = global_batch(restored, padding)
            else:
                ids, padding = source_batch(restored, chunk, rows), None
            generated = decode(restored.params, global_batch(restored, ids), jax.random.fold_in(rng, number), padding)
            generated = np.asarray(multihost_utils.process_allgather(generated, tiled=True))[:len(chunk)]
            if jax.process_index() == 0:
                texts = tokenizer.decode_batch(generated)
                out.write("".join(" ".join(text.splitlines()) + "\n" for text in texts))
                out.flush()
            written += len(chunk)
    return written


def predict_labels(restored: Restored, lines: Iterable[str], out: TextIO) -> int:
    """Classification: each line's label. Tagging: each line's words (split on whitespace) get one tag each."""
    from crosswrite_jax.data import labeled
    from crosswrite_jax.tasks import get_task
    from crosswrite_jax.tasks.labeling import make_predict_step, predicted_labels

    c = restored.run.config
    task, labels = get_task(c.task), c.data.labels
    rows = padded_batch_size(restored, c.eval.batch_size)
    step = jax.jit(make_predict_step(restored.model, task))
    written = 0
    with restored.context():
        for chunk in batches_of(lines, rows):
            if task.name == "classification":
                examples = [(line, labels[0]) for line in chunk]
            else:  # a blank line gets a blank output line
                examples = [(line.split() or ["."], [labels[0]] * max(len(line.split()), 1)) for line in chunk]
            batch, = labeled.eval_batches(task.name, examples, restored.run.tokenizer, labels, batch_size=rows,
                                          max_length=c.data.max_source_length, bucket_lengths=c.data.bucket_lengths)
            ids = step(restored.params, {"inputs": global_batch(restored, batch["inputs"])})
            ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
            predicted = predicted_labels(task.name, [batch], [ids], examples, labels)
            if task.name == "tagging":
                predicted = [tags if line.split() else [] for tags, line in zip(predicted, chunk)]
            if jax.process_index() == 0:
                out.write("".join((p if isinstance(p, str) else " ".join(p)) + "\n" for p in predicted))
                out.flush()
            written += len(chunk)
    return written


def predict(workdir: str | Path, *, input_path: str | Path | None = None, out: TextIO | None = None,
            step: int | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decodes every line of `input_path` (stdin if None or '-') to `out` (stdout if None); returns a summary."""
    from crosswrite_jax.tasks import get_task

    restored = restore(workdir, step, overrides)
    labeled = get_task(restored.run.config.task).labeled
    if restored.model.config.family not in ("encoder_decoder", "decoder") and not labeled:
        raise UserError(f"crosswrite predict generates text, classifies or tags, but this run's task is "
                        f"'{restored.run.config.task}'; predict from a translation, summarization, language-model, "
                        f"classification or tagging run")
    write = predict_labels if labeled else predict_lines
    out = sys.stdout if out is None else out
    started = time.perf_counter()
    if input_path is None or str(input_path) == "-":
        lines = write(restored, sys.stdin, out)
    else:
        path = Path(input_path)
        if not path.is_file():
            raise UserError(f"--input '{path}' is not a file; pass a text file with one input per line, or omit "
                            f"--input to read stdin")
        with path.open(encoding="utf-8") as handle:
            lines = write(restored, handle, out)
    seconds = time.perf_counter() - started
    log.info("predicted %d lines with step %d (%s) in %.1fs", lines, restored.step,
             describe(restored.run.config.decode), seconds)
    return {"command": "predict", "step": restored.step, "lines": lines,
            "decoding": describe(restored.run.config.decode), "seconds": round(seconds, 1)}
