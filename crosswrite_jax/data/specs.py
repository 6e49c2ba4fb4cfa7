"""The source-spec language every reader shares: ``FORMAT:PATTERN[?key=value&key=value]``.

A ``?`` is a glob wildcard unless everything after the last one is ``key=value`` options joined by ``&``. What
formats and options a kind of source accepts is a `Grammar` (raw text sources in `text_sources`, labeled examples in
`labeled`); `parse` checks a spec against one and fills in the defaults. Every error names the spec and the fix.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Mapping

from crosswrite_jax.data.files import encodings
from crosswrite_jax.errors import UserError

BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
FLAGS = ("header",)  # the options of the language that hold true / false


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: ``format:pattern?options`` (options hold the defaults filled in)."""

    format: str
    pattern: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Grammar:
    """The formats and options one kind of source accepts, and what its error messages show."""

    options: Mapping[str, Mapping[str, str | None]]  # format -> option -> default (None: required)
    examples: Mapping[str, str]  # format -> a valid spec, shown as the fix
    purpose: str = ""  # what the sources hold, e.g. "classification" ("unknown option 'x' for classification from tsv")
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)  # format known elsewhere -> why not here
    option_hints: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option valid elsewhere -> where

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.options)

    def usage(self) -> str:
        return (f"FORMAT:PATTERN with FORMAT one of {', '.join(self.formats)}"
                + (f" for {self.purpose}" if self.purpose else ""))


def flag(options: Mapping[str, str], key: str) -> bool:
    """The value of a true / false option (already checked by `parse`)."""
    return BOOLEANS[options[key].lower()]


def split(spec: str) -> tuple[str, str, str] | None:
    """(format, pattern, query) of a spec, or None when it has no ``FORMAT:`` prefix."""
    fmt, colon, rest = spec.strip().partition(":")
    if not colon:
        return None
    pattern, query = rest, ""
    head, question, tail = rest.rpartition("?")
    if question and tail and all("=" in part for part in tail.split("&")):
        pattern, query = head, tail
    return fmt.strip().lower(), pattern.strip(), query


def parse(spec: str, grammar: Grammar) -> SourceSpec:
    """Parses and checks a spec string against a grammar; raises UserError naming the spec and the fix."""
    first = grammar.examples[grammar.formats[0]]
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"source {spec!r} is empty; write {grammar.usage()} (e.g. '{first}')")
    parts = split(spec)
    if parts is None:
        raise UserError(f"source '{spec}' has no format prefix; write {grammar.usage()} "
                        f"(e.g. '{grammar.formats[0]}:{spec.strip()}')")
    fmt, pattern, query = parts
    if fmt in grammar.refused:
        raise UserError(f"source '{spec}': format {fmt} {grammar.refused[fmt]}; use one of "
                        f"{', '.join(grammar.formats)} (e.g. '{first}')")
    if fmt not in grammar.options:
        raise UserError(f"source '{spec}': unknown format '{fmt}'; use one of {', '.join(grammar.formats)}"
                        + (f" for {grammar.purpose}" if grammar.purpose else "") + f" (e.g. '{first}')")
    allowed, example = grammar.options[fmt], grammar.examples[fmt]
    if not pattern:
        raise UserError(f"source '{spec}' names no {'dataset name' if fmt == 'tfds' else 'file path or glob'}; "
                        f"e.g. '{example}'")
    options: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in allowed:
            subject = f"{grammar.purpose} from {fmt}" if grammar.purpose else f"format {fmt}"
            hint = f" ('{key}' is for {grammar.option_hints[key]})" if key in grammar.option_hints else ""
            raise UserError(f"source '{spec}': unknown option '{key}' for {subject}{hint}; valid options: "
                            f"{', '.join(allowed)} (e.g. '{example}')")
        if key in options:
            raise UserError(f"source '{spec}': option '{key}' is given twice; keep one")
        if not value and allowed[key] != "":
            raise UserError(f"source '{spec}': option '{key}' is empty; give a value (e.g. '{example}')")
        options[key] = value
    for key, default in allowed.items():
        if key not in options:
            if default is None:
                raise UserError(f"source '{spec}': format {fmt} needs option '{key}' (e.g. '{example}')")
            options[key] = default
    for key in FLAGS:
        if key in options and options[key].lower() not in BOOLEANS:
            raise UserError(f"source '{spec}': {key}={options[key]!r} is not true or false")
    if "encoding" in options:
        for name in encodings(options["encoding"]):
            try:
                codecs.lookup(name)
            except LookupError:
                raise UserError(f"source '{spec}': encoding {name!r} is not a known codec; use e.g. "
                                f"encoding=utf-8 or encoding=utf-8,latin-1") from None
    return SourceSpec(format=fmt, pattern=pattern, options=options)
