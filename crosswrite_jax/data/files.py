"""Local data files: paths and globs resolved against the data directory, and text read line by line.

Relative patterns resolve against the ``data_dir`` argument, else ``$CROSSWRITE_DATA``, else the current directory;
glob matches come back in sorted order, directories left out. Files may be gzipped (``.gz``) and are UTF-8 unless a
reader is told other codecs (tried in turn per file, e.g. ``utf-8,latin-1``); a leading byte-order mark is dropped
and LF, CRLF and CR all end a line (Python's universal newlines), nothing else does.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from crosswrite_jax.errors import UserError

ENV_DATA_DIR = "CROSSWRITE_DATA"


# ---------------------------------------------------------------------------------------------------------- paths


def base_dir(data_dir: str | os.PathLike | None, *, env: bool = True) -> tuple[str, str]:
    """The directory relative patterns resolve against ('' for the current directory), and where it came from."""
    if data_dir is not None and str(data_dir):
        return os.path.expanduser(str(data_dir)), "the data_dir argument"
    value = os.environ.get(ENV_DATA_DIR, "") if env else ""
    if value:
        return os.path.expanduser(value), f"${ENV_DATA_DIR}"
    return "", "the current directory"


def resolve_paths(pattern: str, data_dir: str | os.PathLike | None = None, *, label: str | None = None,
                  env: bool = True) -> list[str]:
    """The files a path or glob names, sorted; relative ones resolve against data_dir / $CROSSWRITE_DATA / cwd.

    `label` names what asked in error messages (default: the pattern); `env=False` ignores $CROSSWRITE_DATA.
    """
    label = label or f"'{pattern}'"
    pattern = os.path.expanduser(pattern)
    base, origin = base_dir(data_dir, env=env)
    where = "an absolute path" if os.path.isabs(pattern) else f"{os.path.abspath(base or os.curdir)} ({origin})"
    fix = f", or set the data directory (data_dir / ${ENV_DATA_DIR})" if env else ""
    if not glob.has_magic(pattern):
        path = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        if os.path.isdir(path):
            raise UserError(f"{label}: '{path}' is a directory, not a file; name the files in it, "
                            f"e.g. '{os.path.join(pattern, '*.txt')}'")
        if not os.path.isfile(path):
            raise UserError(f"{label}: file '{pattern}' not found, resolved against {where}; check the path{fix}")
        return [path]
    if os.path.isabs(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
    else:
        matches = sorted(os.path.join(base, m) for m in glob.glob(pattern, root_dir=base or None, recursive=True))
    files = [m for m in matches if os.path.isfile(m)]
    if not matches:
        raise UserError(f"{label}: glob '{pattern}' matches no files, resolved against {where}; check the "
                        f"pattern{fix or ', or quote it'}")
    if not files:
        raise UserError(f"{label}: glob '{pattern}' matches only directories ({', '.join(matches[:3])}), resolved "
                        f"against {where}; make it match files, e.g. '{os.path.join(pattern, '*')}'")
    return files


# ---------------------------------------------------------------------------------------------------------- lines


def encodings(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The codecs of an ``encoding`` option ('utf-8,latin-1' or a tuple); UTF-8 when none is named."""
    names = (value or "").split(",") if not isinstance(value, tuple) else value
    return tuple(n.strip() for n in names if n.strip()) or ("utf-8",)


def _is_utf8(codec: str) -> bool:
    return codecs.lookup(codec).name == "utf-8"


@contextlib.contextmanager
def _open(source: Any, name: str) -> Iterator[BinaryIO]:
    """The file's bytes as a stream, gunzipped for a .gz name."""
    try:
        handle = source.open("rb")
    except OSError as error:
        raise UserError(f"{name}: cannot read the file ({error.strerror or error}); check its permissions") from None
    with handle:
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=handle, mode="rb") as unzipped:
                yield unzipped
        else:
            yield handle


@contextlib.contextmanager
def _text(source: Any, name: str, codec: str) -> Iterator[io.TextIOWrapper]:
    """The file as text in one codec, line ends made LF; UnicodeDecodeError passes through, bad files are UserError."""
    with _open(source, name) as raw:
        try:
            with io.TextIOWrapper(raw, encoding="utf-8-sig" if _is_utf8(codec) else codec, newline=None) as text:
                yield text
        except (OSError, EOFError, zlib.error) as error:
            if not name.endswith(".gz"):
                raise UserError(f"{name}: cannot read the file ({error}); check it and its permissions") from None
            raise UserError(f"{name}: not a valid gzip file ({error}); re-compress it or drop the .gz suffix") \
                from None


def _decode_error(source: Any, name: str, names: tuple[str, ...], spec_hint: bool) -> UserError:
    """The error for a file no codec of `names` decodes: where the first one fails, and the fix."""
    where, detail = "", ""
    first = names[0]
    try:
        with _open(source, name) as raw:
            for number, line in enumerate(raw, 1):
                if number == 1 and _is_utf8(first):
                    line = line.removeprefix(codecs.BOM_UTF8)
                try:
                    line.decode(first)
                except UnicodeDecodeError as error:
                    where = f":{number}"
                    detail = f" (byte 0x{line[error.start]:02x} at column {error.start + 1}: {error.reason})"
                    break
    except (OSError, EOFError, zlib.error, UserError):  # the message then names no line
        pass
    tried = "UTF-8" if names == ("utf-8",) else f"decodable as {' or '.join(names)}"
    hint = (", or add encoding=utf-8,latin-1 to the source spec (encoding= argument of the readers)"
            if spec_hint else "")
    return UserError(f"{name}{where}: not {tried} text{detail}; convert the file to UTF-8 "
                     f"(e.g. iconv -f latin1 -t utf-8){hint}")


def _source(path: Any) -> tuple[Any, str]:
    """(something with .open('rb') and .is_dir(), its name): a Path, or an importlib.resources Traversable."""
    source = Path(path) if isinstance(path, (str, os.PathLike)) else path
    name = str(path)
    if source.is_dir():
        raise UserError(f"{name}: is a directory, not a file; name the files in it (e.g. '{name}/*')")
    if isinstance(source, Path) and not source.exists():
        raise UserError(f"{name}: file not found; check the path")
    return source, name


def _check_codecs(name: str, names: tuple[str, ...]) -> None:
    for codec in names:
        try:
            codecs.lookup(codec)
        except LookupError:
            raise UserError(f"{name}: encoding {codec!r} is not a known codec; use e.g. 'utf-8,latin-1'") from None


def iter_lines(path: Any, encoding: str | None = None, *, allow_empty: bool = False) -> Iterator[str]:
    """The lines of a (possibly gzipped) text file, streamed, in one codec (UTF-8 by default); UserError if unusable.

    `encoding` None means UTF-8 with no source spec to change it; an empty file is a UserError unless
    `allow_empty`.
    """
    source, name = _source(path)
    names = encodings(encoding)[:1]
    _check_codecs(name, names)
    empty = True
    try:
        with _text(source, name, names[0]) as text:
            for line in text:
                if empty:
                    line = line.removeprefix("\ufeff")
                empty = False
                yield line[:-1] if line.endswith("\n") else line
    except UnicodeDecodeError:
        raise _decode_error(source, name, names, encoding is not None) from None
    if empty and not allow_empty:
        raise _empty(name)


def read_lines(path: Any, encoding: str | tuple[str, ...] | None = None, *, allow_empty: bool = False) -> list[str]:
    """The lines of a (possibly gzipped) text file, in the first of the codecs that decodes all of it.

    `encoding` is a codec or a comma-separated list (or tuple) tried in turn, e.g. 'utf-8,latin-1'; None means
    UTF-8 with no source spec to change it. An empty file is a UserError unless `allow_empty`.
    """
    source, name = _source(path)
    names = encodings(encoding)
    _check_codecs(name, names)
    for codec in names:
        try:
            with _text(source, name, codec) as text:
                content = text.read().removeprefix("\ufeff")
        except UnicodeDecodeError:
            continue
        if not content:
            if not allow_empty:
                raise _empty(name)
            return []
        return content.removesuffix("\n").split("\n")  # LF only: not the other breaks str.splitlines knows
    raise _decode_error(source, name, names, encoding is not None)


def _empty(name: str) -> UserError:
    return UserError(f"{name}: file is empty{' after decompression' if name.endswith('.gz') else ''}; "
                     f"remove it or make the pattern not match it")
