"""Labeled examples for fine-tuning: readers, label vocabularies, and batches for classification and tagging.

A labeled source is a spec template ``FORMAT:PATH?key=value&...`` in which ``{split}`` stands for the split name:

- ``tsv:sst2/{split}.tsv?text=0&label=1``, ``csv:x/{split}.csv?text=sentence&label=label``: one example per row;
  columns by index (negative counts from the end) or, with a header row, by header name. ``header=true|false``
  (default false for tsv, true for csv). Translation/summarization use ``source=`` and ``target=`` columns.
- ``jsonl:scitldr/{split}.jsonl?source=source&target=target`` (or ``?text=...&label=...``, ``?tokens=...&tags=...``):
  fields may be dotted (``a.b``); a list of strings as text/source is joined with spaces; a list target is the
  references.
- ``conll:ner/wnut17/{split}.conll?tokens=0&tags=-1``: whitespace-separated columns, a blank line between
  sentences, ``-DOCSTART-`` lines skipped.

Every format takes ``encoding=`` (e.g. ``utf-8,latin-1``). Relative paths (globs allowed) resolve against the data_dir
argument, else ``$CROSSWRITE_DATA``, else the current directory.

Examples per task: classification ``(text, label)``; tagging ``(words, tags)``; translation / summarization
``(source, references)``. Batches follow `crosswrite_jax.data.pipeline`: a seeded shuffle per epoch, length grouping
within a window of batches, padding to the smallest bucket length that fits, and per-process rows of each global
batch. Token rows carry the tokenizer's own special tokens ([CLS] ... [SEP] for BERT; a trained tokenizer without
post-processing gets EOS appended).
"""

from __future__ import annotations

import json
import math
import sys
import types
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from crosswrite_jax.data import pipeline, specs
from crosswrite_jax.data.files import resolve_paths
from crosswrite_jax.data.text_sources import _as_text, _field, _missing_field, read_conll, read_delimited, read_jsonl
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks.tagging import OUTSIDE

FORMATS = ("tsv", "csv", "jsonl", "conll")
IGNORE = -1  # label / tag / word index of positions and rows that carry none


# ---------------------------------------------------------------------------------------------------------- reading


def _labeled_tasks() -> list:
    from crosswrite_jax.tasks import TASKS

    return [task for task in TASKS.values() if task.example_fields]


def _task(task: Any) -> Any:
    """The Task (tasks/) that reads labeled examples, given it or its name; the Task says which two fields an
    example has (`example_fields`), the formats that hold them and a sample spec."""
    from crosswrite_jax.tasks import TASKS

    found = TASKS.get(task) if isinstance(task, str) else task
    if found is None or not found.example_fields:
        name = task if isinstance(task, str) else task.name
        raise UserError(f"config key 'task' is {name!r}; choose one of {', '.join(t.name for t in _labeled_tasks())}")
    return found


def _grammar(task: Any) -> specs.Grammar:
    """The formats and options a labeled source for `task` accepts."""
    first, second = task.example_fields
    options: dict[str, dict[str, str]] = {}
    for fmt in task.example_formats:
        if fmt == "jsonl":
            options[fmt] = {first: first, second: second, "encoding": "utf-8"}
        elif fmt == "conll":
            options[fmt] = {first: "0", second: "-1", "encoding": "utf-8"}
        else:
            options[fmt] = {first: "0", second: "1", "header": "true" if fmt == "csv" else "false",
                            "encoding": "utf-8"}
    fields = {t.name: t.example_fields for t in _labeled_tasks()}
    hints = {key: " / ".join(t for t, f in fields.items() if key in f)
             for key in {k for f in fields.values() for k in f} - {first, second}}
    return specs.Grammar(options=options, examples={fmt: task.example_spec for fmt in options}, purpose=task.name,
                         refused={fmt: f"cannot hold {task.name} examples" for fmt in FORMATS if fmt not in options},
                         option_hints=hints)


def _parse(task: Any, spec: str) -> tuple[str, str, dict[str, str]]:
    """(format, path pattern, options with defaults) of a spec whose {split} is already filled in."""
    source = specs.parse(spec, _grammar(task))
    options = source.options
    if source.format == "conll":
        for key in task.example_fields:
            if not _is_int(options[key]):
                raise UserError(f"source '{spec}': {key}={options[key]!r} is not a column index (0 is the first, "
                                f"-1 the last)")
    return source.format, source.pattern, options


def _is_int(value: str) -> bool:
    return value.lstrip("-").isdigit()


def _column(path: str, number: int, names: list[str] | None, count: int, key: str, value: str) -> int:
    """Index of column `value` (an index, or a header name when `names`) in rows of `count` fields."""
    if names is not None and value in names:
        return names.index(value)
    if not _is_int(value):
        if names is None:
            raise UserError(f"{path}:{number}: {key}={value!r} is not a column index (0, 1, ..., -1 the last); "
                            f"give an index, or set header=true to pick columns by header name")
        raise UserError(f"{path}:{number}: no column '{value}' in the header (columns: {', '.join(names)}); set "
                        f"{key}= to one of them or to an index")
    index = int(value)
    if not -count <= index < count:
        raise UserError(f"{path}:{number}: {count} column{'s' if count != 1 else ''}, but {key}={index} was asked "
                        f"for; columns count from 0 (or from -1 at the end), so use 0..{count - 1}")
    return index % count


def _read_delimited(task: Any, path: str, fmt: str, options: dict[str, str], limit: int) -> list:
    first, second = task.example_fields
    rows = read_delimited(path, "\t" if fmt == "tsv" else ",", encoding=options["encoding"])
    count = len(rows[0][1])
    names = None
    if specs.flag(options, "header"):
        number, header = rows[0]
        names = [n.strip() for n in header]
        rows = rows[1:]
    else:
        number = rows[0][0]
    a = _column(path, number, names, count, first, options[first])
    b = _column(path, number, names, count, second, options[second])
    examples = []
    for number, fields in rows:
        if limit and len(examples) >= limit:
            break
        text, value = fields[a].strip(), fields[b].strip()
        if not value:
            raise UserError(f"{path}:{number}: empty {second} in column {options[second]}; every row needs a "
                            f"{'reference' if task.generates else 'label'}: fill it in or drop the row")
        examples.append((text, [value]) if task.generates else (text, value))
    return examples


def _strings(where: str, key: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: field '{field}' ({key}) is {json.dumps(value)[:60]}, not a list of strings; "
                        f"point {key}= at a JSON list of strings")
    return value


def _read_jsonl(task: Any, path: str, options: dict[str, str], limit: int) -> list:
    first, second = task.example_fields
    examples = []
    for number, record in read_jsonl(path, encoding=options["encoding"]):
        if limit and len(examples) >= limit:
            break
        where = f"{path}:{number}"
        values = []
        for key in (first, second):
            try:
                values.append(_field(record, options[key]))
            except KeyError as error:
                message = str(_missing_field(where, options[key], error))
                raise UserError(message.replace("field=", f"{key}=")) from None
        value_a, value_b = values
        if task.per_word:
            words = _strings(where, first, options[first], value_a)
            tags = [t.strip() for t in _strings(where, second, options[second], value_b)]
            if len(words) != len(tags):
                raise UserError(f"{where}: {len(words)} tokens but {len(tags)} tags; every token needs exactly one "
                                f"tag: fix that line")
            if not words:
                raise UserError(f"{where}: no tokens; drop the line or fill it")
            if "" in tags:
                raise UserError(f"{where}: tag {tags.index('')} is empty; every token needs a tag (e.g. O)")
            examples.append((words, tags))
            continue
        text = _as_text(value_a)
        if text is None:
            raise UserError(f"{where}: field '{options[first]}' is {json.dumps(value_a)[:60]}, not a string or a "
                            f"list of strings; point {first}= at text")
        if not task.generates:  # classification
            if isinstance(value_b, bool):
                label = json.dumps(value_b)
            elif isinstance(value_b, (str, int, float)):
                label = str(value_b).strip()
            else:
                raise UserError(f"{where}: label field '{options[second]}' is {json.dumps(value_b)[:60]}; a label "
                                f"must be a string or a number: point label= at it")
            if not label:
                raise UserError(f"{where}: empty label in field '{options[second]}'; every example needs a label")
            examples.append((text.strip(), label))
        else:
            if isinstance(value_b, str):
                references = [value_b.strip()]
            elif isinstance(value_b, list) and value_b and all(isinstance(v, str) for v in value_b):
                references = [v.strip() for v in value_b]
            else:
                raise UserError(f"{where}: target field '{options[second]}' is {json.dumps(value_b)[:60]}, not a "
                                f"string or a non-empty list of strings; point target= at the reference text(s)")
            if not all(references):
                raise UserError(f"{where}: an empty reference in field '{options[second]}'; fill it in or drop it")
            examples.append((text.strip(), references))
    return examples


def _read_conll(path: str, options: dict[str, str], limit: int) -> list:
    tokens, tags = int(options["tokens"]), int(options["tags"])
    needed = max(2, *((i + 1) if i >= 0 else -i for i in (tokens, tags)))
    examples = []
    for sentence in read_conll(path, min_columns=needed, encoding=options["encoding"]):
        if limit and len(examples) >= limit:
            break
        for number, columns in sentence:
            if tokens % len(columns) == tags % len(columns):
                raise UserError(f"{path}:{number}: tokens={tokens} and tags={tags} name the same column of its "
                                f"{len(columns)}; point them at different columns")
        examples.append(([columns[tokens] for _, columns in sentence], [columns[tags] for _, columns in sentence]))
    return examples


def read_examples(task: Any, spec: str, split: str, data_dir: str | None = None, max_examples: int = 0) -> list:
    """The examples of a split that a labeled source spec names (``{split}`` in it replaced by `split`).

    classification: [(text, label)]; tagging: [(words, tags)]; translation / summarization: [(source, references)].
    `max_examples` > 0 keeps the first that many. Bad input raises UserError naming file:line and the fix.
    """
    task = _task(task)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"the {task.name} source is empty; write FORMAT:PATH, e.g. '{task.example_spec}'")
    if max_examples < 0:
        raise UserError(f"max examples is {max_examples}; use 0 (all) or a positive number")
    filled = spec.replace("{split}", split)
    fmt, pattern, options = _parse(task, filled)
    examples: list = []
    for path in resolve_paths(pattern, data_dir, label=f"source '{filled}'"):
        limit = max_examples - len(examples) if max_examples else 0
        if fmt in ("tsv", "csv"):
            examples.extend(_read_delimited(task, path, fmt, options, limit))
        elif fmt == "jsonl":
            examples.extend(_read_jsonl(task, path, options, limit))
        else:
            examples.extend(_read_conll(path, options, limit))
        if max_examples and len(examples) >= max_examples:
            break
    if not examples:
        raise UserError(f"source '{filled}' holds no {task.name} examples; check the path and the options")
    return examples


# ---------------------------------------------------------------------------------------------------------- labels


def _label_key(label: str) -> tuple:
    try:
        number = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def label_vocabulary(task: Any, examples: Sequence) -> tuple[str, ...]:
    """The label set of the examples, in a fixed order (index = label id).

    classification: the sorted unique labels (numbers by value). tagging: "O", then B-X, I-X for each entity type X
    seen, types sorted, then any other tags sorted. translation / summarization: ().
    """
    task = _task(task)
    if task.labeled and not task.per_word:
        return tuple(sorted({label for _, label in examples}, key=_label_key))
    if task.per_word:
        seen = {tag for _, tags in examples for tag in tags}
        types = sorted({tag[2:] for tag in seen if tag[:2] in ("B-", "I-") and tag[2:]})
        bio = [f"{prefix}-{kind}" for kind in types for prefix in "BI"]
        other = sorted(seen - set(bio) - {OUTSIDE})
        return (OUTSIDE, *bio, *other)
    return ()


def _label_index(labels: Sequence[str]) -> dict[str, int]:
    index = {label: i for i, label in enumerate(labels)}
    if not labels or len(index) != len(labels):
        raise UserError(f"config key 'data.labels' is {tuple(labels)}; it must be a non-empty list of distinct "
                        f"labels")
    return index


def _unknown(label: str, i: int, labels: Sequence[str]) -> UserError:
    shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
    return UserError(f"label '{label}' (example {i}) is not in data.labels ({shown}); add it to data.labels or "
                     f"fix the data")


# ---------------------------------------------------------------------------------------------------------- batches


class _Rows:
    """Rows of per-token int32 values (ids, tags, word indices) stored flat with offsets."""

    def __init__(self, fields: dict[str, list[list[int]]]) -> None:
        first = next(iter(fields.values()))
        self.lengths = np.fromiter((len(r) for r in first), dtype=np.int32, count=len(first))
        self.offsets = np.zeros(len(first) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.values = {key: np.fromiter((v for r in rows for v in r), dtype=np.int32, count=int(self.offsets[-1]))
                       for key, rows in fields.items()}

    def view(self, key: str, width: int) -> types.SimpleNamespace:
        """Field `key` as `pipeline.pack` reads rows: ids, lengths, offsets and the packed row width."""
        return types.SimpleNamespace(ids=self.values[key], lengths=self.lengths, offsets=self.offsets, width=width)

    def pad(self, key: str, indices: np.ndarray, width: int, fill: int) -> np.ndarray:
        """Rows `indices` of field `key` (-1: an all-fill row) as an int32 [len(indices), width] array."""
        out = np.full((len(indices), width), fill, dtype=np.int32)
        values = self.values[key]
        for r, i in enumerate(indices):
            if i >= 0:
                out[r, :self.lengths[i]] = values[self.offsets[i]:self.offsets[i + 1]]
        return out


def _encode(task: Any, examples: Sequence, tokenizer: Tokenizer, labels: Sequence[str],
            max_length: int) -> tuple[_Rows, np.ndarray | None]:
    """Token rows (with tags and word indices for tagging) and, for classification, the label id of each example."""
    index = _label_index(labels)
    if not task.per_word:  # classification
        ids = tokenizer.encode_for_model([text for text, _ in examples], max_length)
        label_ids = np.empty(len(examples), dtype=np.int32)
        for i, (_, label) in enumerate(examples):
            if label not in index:
                raise _unknown(label, i, labels)
            label_ids[i] = index[label]
        return _Rows({"inputs": ids}), label_ids
    encoded = tokenizer.encode_words([words for words, _ in examples], max_length)
    ids, tag_rows, word_rows = [], [], []
    for i, ((words, tags), (row, word_ids)) in enumerate(zip(examples, encoded)):
        tag_ids = []
        for tag in tags:
            if tag not in index:
                raise _unknown(tag, i, labels)
            tag_ids.append(index[tag])
        seen: set[int] = set()
        tag_row, word_row = [], []
        for w in word_ids:
            if w is None or w in seen:
                tag_row.append(IGNORE)
                word_row.append(IGNORE)
            else:
                seen.add(w)
                tag_row.append(tag_ids[w])
                word_row.append(w)
        ids.append(row)
        tag_rows.append(tag_row)
        word_rows.append(word_row)
    return _Rows({"inputs": ids, "tags": tag_rows, "word_index": word_rows}), None


class _TaskBatches(pipeline.LengthGroupedBatches):
    """Labeled rows (the same plan as translation batches): inputs with labels or tags."""

    def __init__(self, rows: _Rows, label_ids: np.ndarray | None, **kwargs) -> None:
        super().__init__(rows.lengths, **kwargs)
        self.rows, self.label_ids = rows, label_ids

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rows = self.global_rows(step)
        width = pipeline._bucket(int(self.lengths[rows].max()), self.buckets)
        local = self.local_rows(rows)
        batch = {"inputs": self.rows.pad("inputs", local, width, self.pad_id)}
        if self.label_ids is not None:
            batch["labels"] = self.label_ids[local]
        else:
            batch["tags"] = self.rows.pad("tags", local, width, IGNORE)
        return batch


def _per_segment(rows: list[list[int]], values: np.ndarray, max_segments: int) -> np.ndarray:
    """[len(rows), max_segments] int32: values[i] of each example i a row packs, in its order; -1 elsewhere."""
    out = np.full((len(rows), max_segments), IGNORE, np.int32)
    for r, row in enumerate(rows):
        out[r, :len(row)] = values[row]
    return out


def _packed_batch(encoded: _Rows, label_ids: np.ndarray | None, rows: list[list[int]], width: int,
                  max_segments: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of `width` tokens that each hold the examples listed: ``inputs``, ``inputs_segments``,
    ``inputs_positions`` and ``labels`` [b, max_segments] (one per segment) or ``tags`` [b, width]."""
    inputs, segments, positions = pipeline.pack(encoded.view("inputs", width), rows, pad_id)
    batch = {"inputs": inputs, "inputs_segments": segments, "inputs_positions": positions}
    if label_ids is not None:
        batch["labels"] = _per_segment(rows, label_ids, max_segments)
    else:
        batch["tags"] = pipeline.pack(encoded.view("tags", width), rows, IGNORE)[0]
    return batch


class _PackedTaskBatches(pipeline._PackedBatches):
    """Packed labeled rows (the plan of packed translation batches, at most `max_segments` examples a row)."""

    def __init__(self, encoded: _Rows, label_ids: np.ndarray | None, width: int, **kwargs) -> None:
        shape = encoded.view("inputs", width)
        super().__init__(shape, shape, **kwargs)
        self.encoded, self.label_ids, self.width = encoded, label_ids, width

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return _packed_batch(self.encoded, self.label_ids, self.local_rows(step), self.width, self.max_segments,
                             self.pad_id)


def _packed_eval_batches(encoded: _Rows, label_ids: np.ndarray | None, *, batch_size: int, width: int,
                         max_segments: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """In-order packed batches of every example (filler rows empty), with ``example_index`` [b, max_segments]
    and, for tagging, ``word_index`` [b, width]."""
    count = len(encoded.lengths)
    packed = pipeline._pack_rows(np.arange(count), encoded.lengths, encoded.lengths, width, width, open_rows=1,
                                 max_segments=max_segments)
    batches = []
    for start in range(0, len(packed), batch_size):
        rows = packed[start:start + batch_size]
        rows += [[] for _ in range(batch_size - len(rows))]
        batch = _packed_batch(encoded, label_ids, rows, width, max_segments, pad_id)
        batch["example_index"] = _per_segment(rows, np.arange(count, dtype=np.int32), max_segments)
        if label_ids is None:
            batch["word_index"] = pipeline.pack(encoded.view("word_index", width), rows, IGNORE)[0]
        batches.append(batch)
    return batches


def _seq2seq_pairs(examples: Sequence) -> list[tuple[str, str]]:
    return [(source, reference) for source, references in examples for reference in references]


def train_dataset(task: Any, examples: Sequence, tokenizer: Tokenizer, labels: Sequence[str], *,
                  global_batch_size: int, max_length: int, bucket_lengths: Sequence[int], seed: int,
                  length_grouping_window: int = 16, process_index: int = 0, process_count: int = 1,
                  packing: bool = False, max_segments: int = 0) -> grain.MapDataset:
    """Endless random-access dataset: element k is this process's rows of global training batch k.

    classification: ``inputs`` int32 [b, W], ``labels`` int32 [b]. tagging: ``inputs`` and ``tags`` int32 [b, W], the
    tag id at the first subword of each word and -1 elsewhere (other subwords, special tokens, padding).
    W is the smallest bucket length that fits the global batch's longest row. With `packing`, b rows of W =
    max_length tokens each hold up to segments_per_row(max_segments, W) examples (cut as unpacked ones are):
    ``inputs_segments`` and ``inputs_positions`` [b, W] as well, and ``labels`` [b, K], one per segment.
    translation / summarization: the pipeline's ``inputs`` / ``targets`` batches, one pair per reference, both
    sides cut to max_length.
    """
    task = _task(task)
    if task.generates:
        return pipeline.train_dataset(_seq2seq_pairs(examples), tokenizer, global_batch_size=global_batch_size,
                                      max_source_length=max_length, max_target_length=max_length,
                                      bucket_lengths=bucket_lengths, seed=seed,
                                      length_grouping_window=length_grouping_window, process_index=process_index,
                                      process_count=process_count)
    buckets = pipeline.check_batching(bucket_lengths, global_batch_size, length_grouping_window, process_index,
                                      process_count)
    rows, label_ids = _encode(task, examples, tokenizer, labels, min(max_length, buckets[-1]))
    if packing:
        batches = _PackedTaskBatches(rows, label_ids, max_length, global_rows=global_batch_size, seed=seed,
                                     process_index=process_index, process_count=process_count,
                                     pad_id=tokenizer.pad_id,
                                     max_segments=pipeline.segments_per_row(max_segments, max_length))
        if not batches._plan(0):
            raise UserError(f"{len(examples)} training examples pack into fewer rows than one batch of "
                            f"{global_batch_size}; lower train.batch_size or use a larger split")
        return grain.MapDataset.range(sys.maxsize).map(batches)
    if len(examples) < global_batch_size:
        raise UserError(f"only {len(examples)} training examples, fewer than one batch of {global_batch_size}; "
                        f"lower train.batch_size or use a larger split")
    batches = _TaskBatches(rows, label_ids, global_batch_size=global_batch_size, buckets=buckets, seed=seed,
                           window=length_grouping_window, process_index=process_index, process_count=process_count,
                           pad_id=tokenizer.pad_id)
    return grain.MapDataset.range(sys.maxsize).map(batches)


def eval_batches(task: Any, examples: Sequence, tokenizer: Tokenizer, labels: Sequence[str], *, batch_size: int,
                 max_length: int, bucket_lengths: Sequence[int], packing: bool = False,
                 max_segments: int = 0) -> list[dict[str, np.ndarray]]:
    """In-order batches of every example, `batch_size` rows each; `example_index` int32 [b] is -1 on filler rows.

    Keys as in training (filler rows: pad ids, labels/tags -1); tagging adds ``word_index`` int32 [b, W]: the
    word's position at its first subword, -1 elsewhere. With `packing`, rows are packed in order as in training
    and `example_index` is [b, K], one per segment. translation / summarization: the pipeline's eval batches
    (``inputs``, ``targets`` from the first reference, ``example_index``).
    """
    task = _task(task)
    if task.generates:
        return pipeline.eval_batches([(source, references[0]) for source, references in examples], tokenizer,
                                     batch_size=batch_size, max_source_length=max_length,
                                     bucket_lengths=bucket_lengths, max_target_length=max_length)
    buckets = pipeline._check_buckets(bucket_lengths)
    if batch_size <= 0:
        raise UserError(f"config key 'eval.batch_size' must be positive, got {batch_size}")
    rows, label_ids = _encode(task, examples, tokenizer, labels, min(max_length, buckets[-1]))
    if packing:
        return _packed_eval_batches(rows, label_ids, batch_size=batch_size, width=max_length,
                                    max_segments=pipeline.segments_per_row(max_segments, max_length),
                                    pad_id=tokenizer.pad_id)
    batches = []
    for start in range(0, len(examples), batch_size):
        index = np.arange(start, start + batch_size, dtype=np.int32)
        index[index >= len(examples)] = -1
        width = pipeline._bucket(int(rows.lengths[index[index >= 0]].max()), buckets)
        batch = {"example_index": index, "inputs": rows.pad("inputs", index, width, tokenizer.pad_id)}
        if label_ids is not None:
            batch["labels"] = np.where(index >= 0, label_ids[np.maximum(index, 0)], IGNORE).astype(np.int32)
        else:
            batch["tags"] = rows.pad("tags", index, width, IGNORE)
            batch["word_index"] = rows.pad("word_index", index, width, IGNORE)
        batches.append(batch)
    return batches
