"""Document sources for pretraining (and fine-tuning readers): local text/tsv/csv/jsonl/conll files and TFDS.

A source is a spec string ``FORMAT:PATTERN[?key=value&key=value]``:

- ``text:GLOB`` with ``document=line|paragraph|file`` (default ``line``): one document per non-empty line, per
  blank-line-separated block (its lines joined by single spaces), or per whole file.
- ``tsv:GLOB?column=0`` / ``csv:GLOB?column=text&header=true``: one document per row; ``column`` is an index, or a
  header name when ``header=true``. TSV lines are split on tabs as they are (no quoting); CSV uses Python's csv module.
- ``jsonl:GLOB?field=text``: one JSON value per line; ``field`` may be dotted (``a.b``, list indexes allowed); a list
  of strings is joined with single spaces.
- ``conll:GLOB?column=0``: whitespace-separated columns, a blank line between sentences, ``-DOCSTART-`` lines
  skipped; a document is one sentence's tokens of that column joined by single spaces.
- Any local format takes ``part=SEED:START:STOP``: documents START..STOP-1 of a permutation of the source's documents
  drawn with SEED (`crosswrite_jax.data.subsets.permuted_positions`). Ranges of one permutation are disjoint, and
  ``data.max_train_examples=N`` with ``data.train_subset_seed=SEED`` keeps positions 0..N-1 of the same one: e.g.
  ``text:multi30k/train.en?part=0:2900:15950`` is English text whose sentences are in none of the 2,900 labeled pairs.
- ``tfds:NAME?split=train&field=text&data_dir=DIR``: a prepared TFDS dataset (``name``, ``name/config``,
  ``name:version``, ...) read with random access through ``tfds.data_source`` (ArrayRecord; no TensorFlow needed).
  Nothing is downloaded: prepare the dataset first with ``file_format='array_record'``.

The spec language itself is `crosswrite_jax.data.specs`; paths and reading are `crosswrite_jax.data.files`: local
files may be gzipped (``.gz``), are UTF-8 (a leading BOM is dropped; option ``encoding=utf-8,latin-1`` tries each
listed codec in turn per file) and may have CRLF or CR line ends. Relative patterns resolve against the ``data_dir``
argument, else ``$CROSSWRITE_DATA``, else the current directory; glob matches are read in sorted order. Local
documents are stripped of surrounding whitespace and empty ones are dropped.
"""

from __future__ import annotations

import collections.abc
import csv
import io
import json
import os
import re
from typing import Any

from crosswrite_jax.data import specs, subsets
from crosswrite_jax.data.files import base_dir, read_lines, resolve_paths
from crosswrite_jax.data.specs import SourceSpec
from crosswrite_jax.errors import UserError

FORMATS = ("text", "tsv", "csv", "jsonl", "conll", "tfds")
TEXT_DOCUMENTS = ("line", "paragraph", "file")
_EXAMPLES = {
    "text": "text:corpus/*.txt?document=paragraph",
    "tsv": "tsv:train.tsv?column=0",
    "csv": "csv:train.csv?column=text&header=true",
    "jsonl": "jsonl:train.jsonl?field=text",
    "conll": "conll:train.conll?column=0",
    "tfds": "tfds:wiki40b/en?split=train&field=text&data_dir=gs://my-bucket/tfds",
}
# Per format: option -> default (None: required).
_OPTIONS: dict[str, dict[str, str | None]] = {
    "text": {"document": "line", "encoding": "utf-8", "part": ""},
    "tsv": {"column": "0", "header": "false", "encoding": "utf-8", "part": ""},
    "csv": {"column": "0", "header": "false", "encoding": "utf-8", "part": ""},
    "jsonl": {"field": None, "encoding": "utf-8", "part": ""},
    "conll": {"column": "0", "encoding": "utf-8", "part": ""},
    "tfds": {"split": None, "field": None, "data_dir": ""},
}
_GRAMMAR = specs.Grammar(options=_OPTIONS, examples=_EXAMPLES)
_CONLL_SPLIT = re.compile(r"[ \t]+")


# ---------------------------------------------------------------------------------------------------------- spec


def parse_source(spec: str) -> SourceSpec:
    """Parses and validates a source spec string; raises UserError naming the spec and the fix."""
    source = specs.parse(spec, _GRAMMAR)
    _check_values(spec, source.format, source.options)
    return source


def _check_values(spec: str, fmt: str, options: dict[str, str]) -> None:
    if fmt == "text" and options["document"] not in TEXT_DOCUMENTS:
        raise UserError(f"source '{spec}': document={options['document']!r} is not one of "
                        f"{', '.join(TEXT_DOCUMENTS)}")
    if "column" in options:
        column = options["column"]
        by_name = fmt in ("tsv", "csv") and specs.flag(options, "header")
        if not by_name and not column.isdigit():
            hint = " or set header=true to pick a column by its header name" if fmt in ("tsv", "csv") else ""
            raise UserError(f"source '{spec}': column={column!r} is not a column index (0, 1, ...){hint}")
    if options.get("part"):
        _part(spec, options["part"])


def _part(spec: str, value: str) -> tuple[int, int, int]:
    """(seed, start, stop) of a part=SEED:START:STOP option."""
    fields = value.split(":")
    if len(fields) != 3 or not all(f.isdigit() for f in fields) or int(fields[1]) >= int(fields[2]):
        raise UserError(f"source '{spec}': part={value!r} is not SEED:START:STOP with START < STOP, e.g. "
                        f"part=0:2900:15950 (positions 2900..15949 of the permutation drawn with seed 0)")
    seed, start, stop = map(int, fields)
    return seed, start, stop


def _take_part(spec: str, value: str, documents: list[str]) -> list[str]:
    """The documents that option part=SEED:START:STOP keeps, in their original order."""
    seed, start, stop = _part(spec, value)
    if stop > len(documents):
        raise UserError(f"source '{spec}': part={value} reaches position {stop}, but the source has "
                        f"{len(documents)} documents; lower STOP to at most {len(documents)}")
    return [documents[i] for i in subsets.permuted_positions(len(documents), seed, start, stop)]


# ---------------------------------------------------------------------------------------------------------- files


def _columns(n: int) -> str:
    return f"{n} column{'' if n == 1 else 's'}"


def read_delimited(path: str | os.PathLike, delimiter: str, expected_columns: int | None = None, *,
                   encoding: str = "utf-8") -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank row of a delimited file.

    A tab delimiter splits each line on tabs as it is (no quoting, as TSV files are written); any other delimiter
    is read with Python's csv module (quoted fields may span lines; the row's first line is reported). Every row
    must have ``expected_columns`` fields, or as many as the first row when that is None.
    """
    name = str(path)
    lines = read_lines(path, encoding)
    kind = "tab-separated" if delimiter == "\t" else f"'{delimiter}'-separated"
    rows: list[tuple[int, list[str]]] = []
    if delimiter == "\t":
        for number, line in enumerate(lines, 1):
            if line.strip():
                rows.append((number, line.split("\t")))
    else:
        stream = io.StringIO("\n".join(lines), newline="")
        reader = csv.reader(stream, delimiter=delimiter, strict=True)
        previous_end = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise UserError(f"{name}:{previous_end + 1}: not valid CSV ({error}); check the quoting "
                                f"(a field holding '{delimiter}', a quote or a newline must be double-quoted)") \
                    from None
            start, previous_end = previous_end + 1, reader.line_num
            if any(field.strip() for field in fields):
                rows.append((start, fields))
    if not rows:
        raise UserError(f"{name}: holds no data rows, only blank lines; remove it or fill it")
    want = expected_columns if expected_columns is not None else len(rows[0][1])
    source = "" if expected_columns is not None else f" (as on line {rows[0][0]})"
    for number, fields in rows:
        if len(fields) != want:
            raise UserError(f"{name}:{number}: {_columns(len(fields))}, expected {want}{source}; every line needs "
                            f"{want} {kind} fields: check for a missing or extra delimiter on that line")
    return rows


def read_jsonl(path: str | os.PathLike, *, encoding: str = "utf-8") -> list[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file."""
    name = str(path)
    records: list[tuple[int, Any]] = []
    for number, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise UserError(f"{name}:{number}: not valid JSON ({error}); each line must hold one complete JSON "
                            f"value (JSON Lines)") from None
    if not records:
        raise UserError(f"{name}: holds no JSON lines, only blank lines; remove it or fill it")
    return records


def read_conll(path: str | os.PathLike, min_columns: int = 1, *,
               encoding: str = "utf-8") -> list[list[tuple[int, list[str]]]]:
    """Sentences of a CoNLL file: each a list of (line number, columns) of its token lines.

    Columns are separated by tabs or spaces; blank lines end sentences; ``-DOCSTART-`` lines are skipped (and end a
    sentence). Every token line needs at least ``min_columns`` columns.
    """
    name = str(path)
    sentences: list[list[tuple[int, list[str]]]] = []
    current: list[tuple[int, list[str]]] = []
    for number, line in enumerate(read_lines(path, encoding), 1):
        stripped = line.strip(" \t\ufeff\u200b")  # a stray byte-order mark or zero-width space is blank
        if not stripped or stripped.startswith("-DOCSTART-"):
            if current:
                sentences.append(current)
                current = []
            continue
        columns = _CONLL_SPLIT.split(stripped)
        if len(columns) < min_columns:
            raise UserError(f"{name}:{number}: {_columns(len(columns))}, expected at least {min_columns}; "
                            f"CoNLL token lines hold tab- or space-separated columns (e.g. token<TAB>tag): "
                            f"fix that line, or pick a lower column")
        current.append((number, columns))
    if current:
        sentences.append(current)
    if not sentences:
        raise UserError(f"{name}: holds no CoNLL sentences (only blank or -DOCSTART- lines); remove it or fill it")
    return sentences


# ---------------------------------------------------------------------------------------------------------- documents


def _field(value: Any, field: str) -> Any:
    """The value at a dotted field path; raises KeyError(part, container) where it is missing."""
    if isinstance(value, dict) and field in value:
        return value[field]
    for part in field.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part, value)
    return value


def _as_text(value: Any) -> str | None:
    """A string, or a list of strings joined by spaces; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value)
    return None


def _missing_field(where: str, field: str, error: KeyError) -> UserError:
    part, container = error.args
    if isinstance(container, dict):
        keys = ", ".join(map(str, list(container)[:12])) or "none"
        return UserError(f"{where}: no field '{part}'{'' if part == field else f' (of {field!r})'} "
                         f"(keys there: {keys}); set field= to one of them (dotted a.b for nested)")
    return UserError(f"{where}: cannot look up '{part}' of field '{field}' in a {type(container).__name__}; "
                     f"field= must name object keys (dotted a.b) or list indexes")


def _text_documents(path: str, document: str, encoding: str) -> list[str]:
    lines = read_lines(path, encoding)
    if document == "file":
        return ["\n".join(lines)]
    if document == "line":
        return lines
    paragraphs, block = [], []
    for line in lines:
        if line.strip():
            block.append(line.strip())
        elif block:
            paragraphs.append(" ".join(block))
            block = []
    if block:
        paragraphs.append(" ".join(block))
    return paragraphs


def _delimited_documents(path: str, delimiter: str, column: str, header: bool, encoding: str) -> list[str]:
    rows = read_delimited(path, delimiter, encoding=encoding)
    count = len(rows[0][1])
    if header:
        number, names = rows[0]
        rows = rows[1:]
        names = [n.strip() for n in names]
        if column in names:
            index = names.index(column)
        elif column.isdigit():
            index = int(column)
        else:
            raise UserError(f"{path}:{number}: no column '{column}' in the header (columns: {', '.join(names)}); "
                            f"set column= to one of them or to an index")
    else:
        index, number = int(column), rows[0][0]
    if index >= count:
        raise UserError(f"{path}:{number}: {_columns(count)}, but column={index} was asked for; columns count "
                        f"from 0, so use 0..{count - 1}")
    return [fields[index] for _, fields in rows]


def _jsonl_documents(path: str, field: str, encoding: str) -> list[str]:
    documents = []
    for number, record in read_jsonl(path, encoding=encoding):
        where = f"{path}:{number}"
        try:
            value = _field(record, field)
        except KeyError as error:
            raise _missing_field(where, field, error) from None
        text = _as_text(value)
        if text is None:
            raise UserError(f"{where}: field '{field}' is {json.dumps(value)[:60]} ({type(value).__name__}), "
                            f"not a string or a list of strings; point field= at text")
        documents.append(text)
    return documents


def _conll_documents(path: str, column: int, encoding: str) -> list[str]:
    return [" ".join(columns[column] for _, columns in sentence)
            for sentence in read_conll(path, min_columns=column + 1, encoding=encoding)]


def read_documents(spec: str, data_dir: str | None = None) -> collections.abc.Sequence[str]:
    """The documents a source spec names, with random access: a list for local files, a lazy view for tfds."""
    source = parse_source(spec)
    options = source.options
    if source.format == "tfds":
        return _tfds_documents(spec, source, data_dir)
    documents: list[str] = []
    paths = resolve_paths(source.pattern, data_dir, label=f"source '{spec}'")
    for path in paths:
        encoding = options["encoding"]
        if source.format == "text":
            found = _text_documents(path, options["document"], encoding)
        elif source.format in ("tsv", "csv"):
            found = _delimited_documents(path, "\t" if source.format == "tsv" else ",", options["column"],
                                         specs.flag(options, "header"), encoding)
        elif source.format == "jsonl":
            found = _jsonl_documents(path, options["field"], encoding)
        else:
            found = _conll_documents(path, int(options["column"]), encoding)
        documents.extend(doc.strip() for doc in found)
    if options.get("part"):  # before empty documents are dropped, so that line N is pair N of a parallel corpus
        documents = _take_part(spec, options["part"], documents)
    documents = [doc for doc in documents if doc]
    if not documents:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise UserError(f"source '{spec}' yields no documents from {shown}: every document is empty; check the "
                        f"{'column' if 'column' in options else 'field' if 'field' in options else 'document'} "
                        f"option and the files")
    return documents


# ---------------------------------------------------------------------------------------------------------- tfds


class TfdsDocuments(collections.abc.Sequence):
    """A lazy, random-access view of one text field of a TFDS data source; bytes are decoded on access.

    Empty documents are not dropped (that would need a full pass); they come back as ''.
    """

    def __init__(self, data_source: Any, field: str, label: str):
        self._source = data_source
        self._field = field
        self._label = label

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, record: Any, index: int) -> str:
        where = f"{self._label} record {index}"
        try:
            value = _field(record, self._field)
        except KeyError as error:
            raise _missing_field(where, self._field, error) from None
        if hasattr(value, "tolist"):  # numpy scalar or array (a Sequence(Text) feature)
            value = value.tolist()
        items = value if isinstance(value, (list, tuple)) else [value]
        parts = []
        for item in items:
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise UserError(f"{where}: field '{self._field}' is not UTF-8 text ({error}); "
                                    f"point field= at a Text feature") from None
            if not isinstance(item, str):
                raise UserError(f"{where}: field '{self._field}' holds {type(item).__name__}, not text; "
                                f"point field= at a Text feature")
            parts.append(item)
        return parts[0] if not isinstance(value, (list, tuple)) else " ".join(parts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"{self._label}: index {index} out of range for {length} documents")
        return self._decode(self._source[index], index)

    def __getitems__(self, indices: collections.abc.Sequence[int]) -> list[str]:
        indices = [int(i) for i in indices]
        getitems = getattr(self._source, "__getitems__", None)
        if getitems is None:
            return [self[i] for i in indices]
        return [self._decode(record, i) for i, record in zip(indices, getitems(indices))]

    def __repr__(self) -> str:
        return f"TfdsDocuments({self._label}, field={self._field!r}, {len(self)} documents)"


def _tfds_documents(spec: str, source: SourceSpec, data_dir: str | None) -> TfdsDocuments:
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise UserError(f"source '{spec}' needs the tensorflow-datasets package ({error}); install it with "
                        f"pip install tensorflow-datasets") from None
    options = source.options
    tfds_dir: str | None = options["data_dir"] or None
    if tfds_dir and "://" not in tfds_dir:
        tfds_dir = os.path.expanduser(tfds_dir)
        if not os.path.isabs(tfds_dir):
            base, _ = base_dir(data_dir)
            tfds_dir = os.path.join(base, tfds_dir)
    where = tfds_dir or "TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    label = f"tfds '{source.pattern}' split '{options['split']}'"
    try:
        data_source = tfds.data_source(source.pattern, split=options["split"], data_dir=tfds_dir,
                                       download=False, try_gcs=False)
    except Exception as error:  # TFDS raises many types; all mean "this dataset/split cannot be read here"
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0].strip().rstrip(".")
        hint = " (gs:// data_dir needs gcsfs: pip install gcsfs)" if "gs://" in str(tfds_dir) else ""
        raise UserError(f"source '{spec}': cannot open {label} in {where}: {detail}; check the name, split and "
                        f"data_dir, and prepare the dataset there first with "
                        f"download_and_prepare(file_format='array_record') (nothing is downloaded here){hint}") \
            from None
    documents = TfdsDocuments(data_source, options["field"], f"source '{spec}'")
    if len(documents) == 0:
        raise UserError(f"source '{spec}': {label} in {where} has no records; pick a non-empty split")
    _ = documents[0]  # fail now, not mid-training, if the field is missing or not text
    return documents
