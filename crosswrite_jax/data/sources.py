"""Sentence-pair sources: the bundled Multi30k sample or a directory of {split}.{lang}[.gz] files."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from crosswrite_jax.data.files import read_lines
from crosswrite_jax.errors import UserError

BUNDLED = "multi30k_sample"
_SPLIT_ALIASES = {"test": ("test", "test_2016_flickr")}


def _find(root: Any, split: str, lang: str, where: str) -> Any:
    candidates = [f"{name}.{lang}{ext}" for name in _SPLIT_ALIASES.get(split, (split,)) for ext in ("", ".gz")]
    for name in candidates:
        path = root / name
        if path.is_file():
            return path
    raise UserError(f"split '{split}' for language '{lang}' not found in {where}: looked for "
                    f"{', '.join(candidates)}; check data.dataset, the split name and the language codes")


def read_parallel(dataset: str, split: str, source_lang: str, target_lang: str,
                  max_examples: int = 0) -> list[tuple[str, str]]:
    """Reads aligned (source, target) sentence pairs of one split; max_examples > 0 keeps the first N."""
    if dataset == BUNDLED:
        root: Any = importlib.resources.files("crosswrite_jax.data") / BUNDLED
        where = f"the bundled '{BUNDLED}' (splits: train, val, test; languages: en, de)"
    else:
        root = Path(dataset).expanduser()
        if not root.is_dir():
            raise UserError(f"data.dataset '{dataset}' is not a directory; pass '{BUNDLED}' or a directory "
                            f"holding {{split}}.{{lang}} or {{split}}.{{lang}}.gz files")
        where = f"'{root}'"
    source_path = _find(root, split, source_lang, where)
    target_path = _find(root, split, target_lang, where)
    sources, targets = read_lines(source_path, allow_empty=True), read_lines(target_path, allow_empty=True)
    if len(sources) != len(targets):
        raise UserError(f"'{source_path}' has {len(sources)} lines but '{target_path}' has {len(targets)}; "
                        f"the two sides of a split must be line-aligned")
    if not sources:
        raise UserError(f"split '{split}' is empty: '{source_path}' and '{target_path}' hold no lines")
    pairs = list(zip(sources, targets))
    return pairs[:max_examples] if max_examples > 0 else pairs
