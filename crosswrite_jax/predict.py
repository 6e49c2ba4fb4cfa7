"""Prediction from a checkpoint: one output line per input line, in order and flushed per batch: a translation
or summary, a continuation (decoder-only runs), a label (classification) or a tag per word (tagging).

`Predictor.outputs` maps a list of texts to those outputs (with task-specific details); `crosswrite predict` and
`crosswrite serve` both go through it."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from crosswrite_jax import config as config_lib
from crosswrite_jax.config import DecodeConfig
from crosswrite_jax.data import pipeline, prompts
from crosswrite_jax.decode import describe
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import Restored, global_batch, padded_batch_size, restore
from crosswrite_jax.models.transformer import PAD_ID
from crosswrite_jax.workdir import BEST, CHECKPOINTS

log = logging.getLogger("crosswrite")

UNLIMITED = 1 << 30  # a max_length that truncates nothing
# The key beside "output" that names a generated text, by task (decoder-only runs: "continuation").


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
    return prompts.prompt_batch(restored.run.tokenizer, lines, rows, c.data.max_source_length, c.data.bucket_lengths)


class Predictor:
    """A restored run with its jitted steps, built once: maps a list of texts to one output each.

    Each output is a dict: "output", the line `crosswrite predict` prints for the text, and the task's details
    beside it (classification: label, probabilities; tagging: words with tags, entity spans; generation: the
    translation, summary or continuation).
    """

    def __init__(self, restored: Restored):
        from crosswrite_jax.tasks import get_task
        from crosswrite_jax.tasks.labeling import make_predict_step

        c = restored.run.config
        self.restored, self.task, self.family = restored, c.task, restored.model.config.family
        self.spec = get_task(c.task)  # what the task is; self.task is its name
        self.labeled = self.spec.labeled
        if self.family not in ("encoder_decoder", "decoder") and not self.labeled:
            raise UserError(f"crosswrite predict generates text, classifies or tags, but this run's task is "
                            f"'{c.task}'; predict from a translation, summarization, language-model, "
                            f"classification or tagging run")
        self.rows = padded_batch_size(restored, c.eval.batch_size)
        self.folder: Path | None = None  # the checkpoint folder restored from, when known
        self.labels = tuple(c.data.labels) if self.labeled else ()
        self._decoders: dict[tuple[DecodeConfig, int], Any] = {}
        # Encoding to a max length switches the tokenizer's truncation on and off: one thread at a time.
        self._tokenizer_lock = threading.Lock()
        if self.labeled and not self.spec.per_word:  # classification: probabilities as well
            self._label_step = jax.jit(_classify(restored.model))
        elif self.labeled:
            predict_ids = make_predict_step(restored.model, self.spec)
            self._label_step = jax.jit(lambda params, inputs: (predict_ids(params, {"inputs": inputs}), None))

    @property
    def generates(self) -> bool:
        return not self.labeled

    def input_limit(self) -> int:
        """The most tokens a text may take (special tokens, EOS or the start token included); longer ones are cut."""
        d = self.restored.run.config.data
        if self.family == "decoder" and self.generates:
            return d.max_source_length  # a prompt keeps its last tokens
        return min(d.max_source_length, max(d.bucket_lengths))

    def input_lengths(self, texts: list[str]) -> list[int]:
        """The tokens each text would take untruncated, special tokens included (compare with input_limit)."""
        tokenizer = self.restored.run.tokenizer
        with self._tokenizer_lock:
            if self.labeled and not self.spec.per_word:
                return [len(ids) for ids in tokenizer.encode_for_model(texts, UNLIMITED)]
            if self.labeled:
                words = [t.split() or ["."] for t in texts]
                return [len(ids) for ids, _ in tokenizer.encode_words(words, UNLIMITED)]
            texts = self.spec.prompts(self.restored.run.config, texts)
            return [len(ids) + 1 for ids in tokenizer.encode_batch(texts)]  # + EOS, or the decoder's start token

    def widths(self) -> list[int]:
        """Every input width a batch can take: the bucket lengths up to the first that holds input_limit."""
        buckets, limit = sorted(self.restored.run.config.data.bucket_lengths), self.input_limit()
        return [b for b in buckets if b < limit] + [next((b for b in buckets if b >= limit), limit)]

    def batch_rows(self, rows: int) -> int:
        """`rows` rounded up so they split evenly over the devices' batch axes."""
        return padded_batch_size(self.restored, rows)

    def decode_config(self, settings: dict[str, Any] | None) -> tuple[DecodeConfig, int]:
        """(decode config, max length) of the run with `settings` (decode.* keys and max_length) over it.

        Values are checked as `--config.decode.*` overrides are; max_length may not exceed eval.max_decode_length.
        """
        c = self.restored.run.config
        settings = dict(settings or {})
        max_length = settings.pop("max_length", None)
        if max_length is None:
            max_length = c.eval.max_decode_length
        elif not 1 <= max_length <= c.eval.max_decode_length:
            raise UserError(f"max_length must be between 1 and {c.eval.max_decode_length} (the run's "
                            f"eval.max_decode_length), got {max_length}")
        if not settings:
            return c.decode, max_length
        config = config_lib.override(c, {f"decode.{key}": value for key, value in settings.items()})
        return config.decode, max_length

    def decoder(self, decode: DecodeConfig | None = None, max_length: int | None = None):
        """The jitted decoder for `decode` (default: the run's decode.*) up to `max_length` tokens, cached."""
        c = self.restored.run.config
        key = (decode or c.decode, max_length or c.eval.max_decode_length)
        if key not in self._decoders:
            run = dataclasses.replace(self.restored.run, config=dataclasses.replace(c, decode=key[0]))
            self._decoders[key] = dataclasses.replace(self.restored, run=run).decoder(key[1])
        return self._decoders[key]

    def outputs(self, texts: list[str], *, rows: int | None = None, decode: DecodeConfig | None = None,
                max_length: int | None = None, rng: jax.Array | None = None) -> list[dict[str, Any]]:
        """One output per text (see the class), from one batch of `rows` rows (default eval.batch_size)."""
        rows = self.rows if rows is None else rows
        if not 0 < len(texts) <= rows:
            raise ValueError(f"{len(texts)} texts do not fit a batch of {rows} rows")
        with self.restored.context():
            if self.labeled:
                return self._label(texts, rows)
            return self._generate(texts, rows, decode, max_length, rng)

    def warm_up(self, rows: int, width: int, decode: DecodeConfig | None = None,
                max_length: int | None = None) -> None:
        """Compiles (and runs once) the step for batches of [rows, width]."""
        ids = np.full((rows, width), PAD_ID, np.int32)
        ids[:, 0] = self.restored.run.tokenizer.eos_id
        with self.restored.context():
            if self.labeled:
                jax.block_until_ready(self._label_step(self.restored.params, global_batch(self.restored, ids)))
            elif self.family == "decoder":
                ids[:, 0] = PAD_ID  # the start token alone
                padding = np.zeros((rows, width), bool)
                padding[:, 0] = True
                self._decode_ids(ids, padding, decode, max_length, None)
            else:
                self._decode_ids(ids, None, decode, max_length, None)

    def _decode_ids(self, ids: np.ndarray, padding: np.ndarray | None, decode: DecodeConfig | None,
                    max_length: int | None, rng: jax.Array | None) -> np.ndarray:
        r = self.restored
        padding = None if padding is None else global_batch(r, padding)
        generated = self.decoder(decode, max_length)(r.params, global_batch(r, ids), rng, padding)
        return np.asarray(multihost_utils.process_allgather(generated, tiled=True))

    def _generate(self, texts: list[str], rows: int, decode: DecodeConfig | None, max_length: int | None,
                  rng: jax.Array | None) -> list[dict[str, Any]]:
        with self._tokenizer_lock:
            if self.family == "decoder":
                ids, padding = prompt_batch(self.restored, self.spec.prompts(self.restored.run.config, texts), rows)
            else:
                ids, padding = source_batch(self.restored, texts, rows), None
        return self.generated_outputs(self._decode_ids(ids, padding, decode, max_length, rng)[:len(texts)])

    def generated_outputs(self, generated: np.ndarray) -> list[dict[str, Any]]:
        """One output (see the class) per row of generated ids [N, L] (EOS, then PAD, after each text)."""
        key = self.spec.output_key if self.spec.generates else "continuation"  # a language model continues text
        return [{"output": " ".join(text.splitlines()), key: text}
                for text in self.restored.run.tokenizer.decode_batch(generated)]

    def source_ids(self, texts: list[str]) -> np.ndarray:
        """Encoder inputs [len(texts), bucket width] for an encoder-decoder run's texts, as predict makes them."""
        with self._tokenizer_lock:
            return source_batch(self.restored, texts, len(texts))

    def _label(self, texts: list[str], rows: int) -> list[dict[str, Any]]:
        from crosswrite_jax.data import labeled
        c, labels = self.restored.run.config, self.labels
        if not self.spec.per_word:
            examples = [(text, labels[0]) for text in texts]
        else:  # a blank text gets a blank output
            examples = [(text.split() or ["."], [labels[0]] * max(len(text.split()), 1)) for text in texts]
        with self._tokenizer_lock:
            batch, = labeled.eval_batches(self.task, examples, self.restored.run.tokenizer, labels, batch_size=rows,
                                          max_length=c.data.max_source_length, bucket_lengths=c.data.bucket_lengths)
        ids, probabilities = self._label_step(self.restored.params, global_batch(self.restored, batch["inputs"]))
        ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
        predicted = self.spec.predicted_labels([batch], [ids], examples, labels)
        if not self.spec.per_word:
            probabilities = np.asarray(multihost_utils.process_allgather(probabilities, tiled=True))
            return [{"output": label, "label": label,
                     "probabilities": {name: round(float(p), 6) for name, p in zip(labels, probabilities[row])}}
                    for row, label in enumerate(predicted)]
        return [_tagged(text.split(), tags if text.split() else []) for text, tags in zip(texts, predicted)]


def _classify(model):
    """`(params, inputs) -> (label ids [B], probabilities [B, labels])`, no dropout."""

    def step(params, inputs):
        logits = model.apply({"params": params}, inputs, deterministic=True)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return step


def _tagged(words: list[str], tags: list[str]) -> dict[str, Any]:
    """A tagging output: the tags line, each word with its tag, and the entity spans (seqeval's BIO chunks)."""
    from seqeval.metrics.sequence_labeling import get_entities

    entities = [{"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start:end + 1])}
                for kind, start, end in get_entities(list(tags))]
    return {"output": " ".join(tags), "words": [{"word": w, "tag": t} for w, t in zip(words, tags)],
            "entities": entities}


def text_lines(raw: Iterable[bytes], name: str) -> Iterator[str]:
    """Lines of bytes decoded as strict UTF-8; a line that is not (or holds NUL bytes) is one error naming
    NAME:LINE."""
    for number, line in enumerate(raw, 1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a byte order mark
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{name}:{number}: not UTF-8 text (byte {line[error.start]:#04x} at column "
                            f"{error.start + 1}); convert the input to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
        if "\x00" in text:
            raise UserError(f"{name}:{number}: holds NUL bytes, so it is binary, not text; pass a text file with one "
                            f"input per line")
        yield text


def write_predictions(predictor: Predictor, lines: Iterable[str], out: TextIO) -> tuple[int, int]:
    """Writes one output line per input line, in order, flushing after each batch; returns the line count and
    how many of the inputs were longer than the model takes (and cut)."""
    rng = jax.random.key(predictor.restored.run.config.decode.seed)
    written = cut = 0
    limit = predictor.input_limit()
    for number, chunk in enumerate(batches_of(lines, predictor.rows)):
        cut += sum(length > limit for length in predictor.input_lengths(chunk))
        outputs = predictor.outputs(chunk, rng=jax.random.fold_in(rng, number))
        if jax.process_index() == 0:
            out.write("".join(o["output"] + "\n" for o in outputs))
            out.flush()
        written += len(chunk)
    return written, cut


def checkpoint_to_use(workdir: str | Path, step: int | None = None,
                      checkpoint: str | None = None) -> tuple[int | None, Path | None]:
    """(step or None for the newest, folder) to restore: by default WORKDIR/best when the run has one, else
    checkpoints/. `checkpoint` is 'best', 'newest' or a step number; a step is looked up in checkpoints/, then
    best/."""
    workdir = Path(workdir)
    best, newest = workdir / BEST, workdir / CHECKPOINTS
    if checkpoint is not None:
        if checkpoint.isdigit():
            step = int(checkpoint)
        elif checkpoint == "newest":
            return None, newest
        elif checkpoint != "best":
            raise UserError(f"--checkpoint is 'best', 'newest' or a step number, got {checkpoint!r}")
        elif not _steps(best):
            raise UserError(f"--workdir '{workdir}' has no best/ checkpoint (kept when train.best_metric is set); "
                            f"pass --checkpoint newest or a step number")
        else:
            return None, best
    if step is not None:
        return step, best if step in _steps(best) and step not in _steps(newest) else newest
    return None, best if _steps(best) else newest


def _steps(folder: Path) -> set[int]:
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def load_predictor(workdir: str | Path, step: int | None = None, overrides: dict[str, Any] | None = None,
                   checkpoint: str | None = None) -> Predictor:
    """The run's checkpoint (see checkpoint_to_use) restored onto the devices present, ready to predict."""
    step, folder = checkpoint_to_use(workdir, step, checkpoint)
    restored = restore(workdir, step, overrides, folder)
    predictor = Predictor(restored)
    predictor.folder = folder
    log.info("using step %d from %s", restored.step, folder)
    return predictor


def predict(workdir: str | Path, *, input_path: str | Path | None = None, out: TextIO | None = None,
            step: int | None = None, overrides: dict[str, Any] | None = None,
            checkpoint: str | None = None) -> dict[str, Any]:
    """Decodes every line of `input_path` (stdin if None or '-') to `out` (stdout if None); returns a summary.

    The checkpoint is the run's best/ one when it has one, else the newest (see checkpoint_to_use)."""
    predictor = load_predictor(workdir, step, overrides, checkpoint)
    restored = predictor.restored
    out = sys.stdout if out is None else out
    started = time.perf_counter()
    if input_path is None or str(input_path) == "-":
        lines, cut = write_predictions(predictor, text_lines(sys.stdin.buffer, "<stdin>"), out)
    else:
        path = Path(input_path)
        if not path.is_file():
            raise UserError(f"--input '{path}' is not a file; pass a text file with one input per line, or omit "
                            f"--input to read stdin")
        with path.open("rb") as handle:
            lines, cut = write_predictions(predictor, text_lines(handle, str(path)), out)
    if cut:
        log.warning("%d input%s longer than %d tokens %s cut", cut, "s" if cut > 1 else "", predictor.input_limit(),
                    "were" if cut > 1 else "was")
    seconds = time.perf_counter() - started
    log.info("predicted %d lines with step %d (%s) in %.1fs", lines, restored.step,
             describe(restored.run.config.decode), seconds)
    return {"command": "predict", "step": restored.step, "checkpoint": str(predictor.folder),
            "lines": lines, "truncated": cut, "decoding": describe(restored.run.config.decode),
            "seconds": round(seconds, 1)}
