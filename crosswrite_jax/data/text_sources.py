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
- ``tfds:NAME?split=train&field=text&data_dir=DIR``: a prepared TFDS dataset (``name``, ``name/config``,
  ``name:version``, ...) read with random access through ``tfds.data_source`` (ArrayRecord; no TensorFlow needed).
  Nothing is downloaded: prepare the dataset first with ``file_format='array_record'``.

Local files may be gzipped (``.gz``), are UTF-8 (a leading BOM is dropped; option ``encoding=utf-8,latin-1`` tries
each listed codec in turn per file) and may have CRLF line ends. Relative
patterns resolve against the ``data_dir`` argument, else ``$CROSSWRITE_DATA``, else the current directory; glob
matches are read in sorted order. Local documents are stripped of surrounding whitespace and empty ones are dropped.
"""

from __future__ import annotations

import codecs
import collections.abc
import csv
import dataclasses
import glob
import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from crosswrite_jax.errors import UserError

ENV_DATA_DIR = "CROSSWRITE_DATA"
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
    "text": {"document": "line", "encoding": "utf-8"},
    "tsv": {"column": "0", "header": "false", "encoding": "utf-8"},
    "csv": {"column": "0", "header": "false", "encoding": "utf-8"},
    "jsonl": {"field": None, "encoding": "utf-8"},
    "conll": {"column": "0", "encoding": "utf-8"},
    "tfds": {"split": None, "field": None, "data_dir": ""},
}
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_CONLL_SPLIT = re.compile(r"[ \t]+")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: ``format:pattern?options`` (options hold the defaults filled in)."""

    format: str
    pattern: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- spec


def parse_source(spec: str) -> SourceSpec:
    """Parses and validates a source spec string; raises UserError naming the spec and the fix."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"source {spec!r} is empty; write FORMAT:PATTERN with FORMAT one of {', '.join(FORMATS)} "
                        f"(e.g. '{_EXAMPLES['text']}')")
    fmt, colon, rest = spec.strip().partition(":")
    if not colon:
        raise UserError(f"source '{spec}' has no format prefix; write FORMAT:PATTERN with FORMAT one of "
                        f"{', '.join(FORMATS)} (e.g. 'text:{spec}')")
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise UserError(f"source '{spec}': unknown format '{fmt}'; use one of {', '.join(FORMATS)} "
                        f"(e.g. '{_EXAMPLES['text']}')")
    pattern, query = rest, ""
    head, question, tail = rest.rpartition("?")
    # A '?' is a glob wildcard unless what follows it is key=value options.
    if question and tail and all("=" in part for part in tail.split("&")):
        pattern, query = head, tail
    pattern = pattern.strip()
    allowed = _OPTIONS[fmt]
    what = "dataset name" if fmt == "tfds" else "file path or glob"
    if not pattern:
        raise UserError(f"source '{spec}' names no {what}; e.g. '{_EXAMPLES[fmt]}'")
    options: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in allowed:
            raise UserError(f"source '{spec}': unknown option '{key}' for format {fmt}; valid options: "
                            f"{', '.join(allowed)} (e.g. '{_EXAMPLES[fmt]}')")
        if key in options:
            raise UserError(f"source '{spec}': option '{key}' is given twice; keep one")
        options[key] = value
    for key, default in allowed.items():
        if key not in options:
            if default is None:
                raise UserError(f"source '{spec}': format {fmt} needs option '{key}' (e.g. '{_EXAMPLES[fmt]}')")
            options[key] = default
    _check_values(spec, fmt, options)
    return SourceSpec(format=fmt, pattern=pattern, options=options)


def _check_values(spec: str, fmt: str, options: dict[str, str]) -> None:
    if fmt == "text" and options["document"] not in TEXT_DOCUMENTS:
        raise UserError(f"source '{spec}': document={options['document']!r} is not one of "
                        f"{', '.join(TEXT_DOCUMENTS)}")
    if "header" in options and options["header"].lower() not in _BOOLEANS:
        raise UserError(f"source '{spec}': header={options['header']!r} is not true or false")
    if "column" in options:
        column = options["column"]
        by_name = fmt in ("tsv", "csv") and _BOOLEANS[options["header"].lower()]
        if not column:
            raise UserError(f"source '{spec}': column is empty; give a column index (0 is the first)"
                            + (" or a header name" if by_name else ""))
        if not by_name and not (column.isdigit()):
            hint = " or set header=true to pick a column by its header name" if fmt in ("tsv", "csv") else ""
            raise UserError(f"source '{spec}': column={column!r} is not a column index (0, 1, ...){hint}")
    if "encoding" in options:
        for name in _encodings(options["encoding"]):
            try:
                codecs.lookup(name)
            except LookupError:
                raise UserError(f"source '{spec}': encoding {name!r} is not a known codec; use e.g. "
                                f"encoding=utf-8 or encoding=utf-8,latin-1") from None
    for key in ("field", "split"):
        if key in options and not options[key]:
            raise UserError(f"source '{spec}': option '{key}' is empty; e.g. '{_EXAMPLES[fmt]}'")


def _encodings(value: str | tuple[str, ...]) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    return tuple(n.strip() for n in names if n.strip()) or ("utf-8",)


# ---------------------------------------------------------------------------------------------------------- paths


def _base_dir(data_dir: str | os.PathLike | None) -> tuple[str, str]:
    """The directory relative patterns resolve against ('' for the current directory), and where it came from."""
    if data_dir is not None and str(data_dir):
        return os.path.expanduser(str(data_dir)), "the data_dir argument"
    env = os.environ.get(ENV_DATA_DIR, "")
    if env:
        return os.path.expanduser(env), f"${ENV_DATA_DIR}"
    return "", "the current directory"


def resolve_paths(pattern: str, data_dir: str | os.PathLike | None = None, spec: str | None = None) -> list[str]:
    """The files a path or glob names, sorted; relative ones resolve against data_dir / $CROSSWRITE_DATA / cwd."""
    label = f"source '{spec}'" if spec else f"'{pattern}'"
    pattern = os.path.expanduser(pattern)
    base, origin = _base_dir(data_dir)
    where = f"{os.path.abspath(base or os.curdir)} ({origin})"
    if os.path.isabs(pattern):
        where = "an absolute path"
    if not glob.has_magic(pattern):
        path = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        if os.path.isdir(path):
            raise UserError(f"{label}: '{path}' is a directory, not a file; name the files in it, "
                            f"e.g. '{os.path.join(pattern, '*.txt')}'")
        if not os.path.isfile(path):
            raise UserError(f"{label}: file '{pattern}' not found, resolved against {where}; check the path, "
                            f"or set the data directory (data_dir / ${ENV_DATA_DIR})")
        return [path]
    if os.path.isabs(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
    else:
        matches = sorted(os.path.join(base, m) for m in glob.glob(pattern, root_dir=base or None, recursive=True))
    files = [m for m in matches if os.path.isfile(m)]
    if not matches:
        raise UserError(f"{label}: glob '{pattern}' matches no file, resolved against {where}; check the "
                        f"pattern, or set the data directory (data_dir / ${ENV_DATA_DIR})")
    if not files:
        raise UserError(f"{label}: glob '{pattern}' matches only directories ({', '.join(matches[:3])}), resolved "
                        f"against {where}; make it match files, e.g. '{os.path.join(pattern, '*')}'")
    return files


# ---------------------------------------------------------------------------------------------------------- files


def _read_text(path: str | os.PathLike, encoding: str | tuple[str, ...] = "utf-8") -> str:
    """The text of a (possibly gzipped) file with CRLF/CR line ends made LF; UserError if unusable.

    ``encoding`` is a codec or a comma-separated list (or tuple) of codecs tried in turn (e.g. 'utf-8,latin-1').
    """
    name = str(path)
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{name}: is a directory, not a file; name the files in it (e.g. '{name}/*')")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{name}: file not found; check the path") from None
    except OSError as error:
        raise UserError(f"{name}: cannot read the file ({error.strerror or error}); check its permissions") from None
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise UserError(f"{name}: not a valid gzip file ({error}); re-compress it or drop the .gz suffix") \
                from None
    if not data:
        raise UserError(f"{name}: file is empty{' after decompression' if name.endswith('.gz') else ''}; "
                        f"remove it or make the pattern not match it")
    names = _encodings(encoding)
    first_error: UnicodeDecodeError | None = None
    for codec in names:
        try:
            text = data.decode("utf-8-sig" if codecs.lookup(codec).name == "utf-8" else codec)
            break
        except UnicodeDecodeError as error:
            first_error = first_error or error
        except LookupError:
            raise UserError(f"{name}: encoding {codec!r} is not a known codec; use e.g. 'utf-8,latin-1'") from None
    else:
        error = first_error
        data = error.object  # without a BOM that utf-8-sig dropped: offsets are into this
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        tried = "UTF-8" if names == ("utf-8",) else f"decodable as {' or '.join(names)}"
        raise UserError(f"{name}:{line}: not {tried} text (byte 0x{data[error.start]:02x} at column {column}: "
                        f"{error.reason}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or add "
                        f"encoding=utf-8,latin-1 to the source spec (encoding= argument of the readers)") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _lines(text: str) -> list[str]:
    """Lines split on LF only (not on the other characters str.splitlines breaks at); no final empty line."""
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")


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
    text = _read_text(path, encoding)
    kind = "tab-separated" if delimiter == "\t" else f"'{delimiter}'-separated"
    rows: list[tuple[int, list[str]]] = []
    if delimiter == "\t":
        for number, line in enumerate(_lines(text), 1):
            if line.strip():
                rows.append((number, line.split("\t")))
    else:
        stream = io.StringIO(text, newline="")
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
    for number, line in enumerate(_lines(_read_text(path, encoding)), 1):
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
    for number, line in enumerate(_lines(_read_text(path, encoding)), 1):
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
    text = _read_text(path, encoding)
    if document == "file":
        return [text]
    lines = _lines(text)
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
    paths = resolve_paths(source.pattern, data_dir, spec)
    for path in paths:
        encoding = options["encoding"]
        if source.format == "text":
            found = _text_documents(path, options["document"], encoding)
        elif source.format in ("tsv", "csv"):
            found = _delimited_documents(path, "\t" if source.format == "tsv" else ",", options["column"],
                                         _BOOLEANS[options["header"].lower()], encoding)
        elif source.format == "jsonl":
            found = _jsonl_documents(path, options["field"], encoding)
        else:
            found = _conll_documents(path, int(options["column"]), encoding)
        documents.extend(d for d in (doc.strip() for doc in found) if d)
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
            base, _ = _base_dir(data_dir)
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
