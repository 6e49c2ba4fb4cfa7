"""Regenerates the bundled Multi30k sample (crosswrite_jax/data/multi30k_sample) from the raw files."""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crosswrite_jax" / "data" / "multi30k_sample"
LANGS = ("en", "de")
TRAIN_PAIRS = 8000
VAL_PAIRS = 500
SEED = 0

NOTICE = """# Multi30k sample

The files in this folder are a small sample of the Multi30k English-German dataset:

> Desmond Elliott, Stella Frank, Khalil Sima'an, Lucia Specia. 2016.
> "Multi30K: Multilingual English-German Image Descriptions". Proceedings of the
> 5th Workshop on Vision and Language, pages 70-74.

Source: https://github.com/multi30k/dataset, folder `data/task1/raw/` (commit a3d2e0d2).
The captions are derived from Flickr30k images and are published for research use; no other
license is stated. They are bundled here only as a small built-in demo; cite the paper above
if you use them, and get the full data set from its repository.

Which lines were taken (one sentence per line, cased, untokenized, UTF-8; gzipped, unchanged):

- `train.{{en,de}}.gz`: {train} of the {train_total} lines of `train.{{en,de}}`, chosen by
  `numpy.random.default_rng({seed}).permutation({train_total})[:{train}]`, kept in their original order.
- `val.{{en,de}}.gz`: the first {val} of the {val_total} lines of `val.{{en,de}}`.
- `test.{{en,de}}.gz`: all {test_total} lines of `test_2016_flickr.{{en,de}}`.

Regenerate them with `python scripts/make_multi30k_sample.py [DATA_DIR]`.
"""


def _read(path: Path) -> list[str]:
    if not path.is_file():
        sys.exit(f"error: '{path}' not found; pass the directory holding the raw Multi30k files")
    text = path.read_text(encoding="utf-8")
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


def _write(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
        f.write(data)


def main(argv: list[str] | None = None) -> None:
    """Reads the raw Multi30k files and writes the gzipped sample and its NOTICE.md."""
    default = Path(os.environ.get("CROSSWRITE_DATA", ROOT.parent / "shared" / "data")) / "multi30k"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", nargs="?", type=Path, default=default,
                        help=f"directory with train/val/test_2016_flickr.{{en,de}} (default: {default})")
    args = parser.parse_args(argv)
    raw = {(split, lang): _read(args.data_dir / f"{split}.{lang}")
           for split in ("train", "val", "test_2016_flickr") for lang in LANGS}
    for split in ("train", "val", "test_2016_flickr"):
        if len(raw[split, "en"]) != len(raw[split, "de"]):
            sys.exit(f"error: {split}.en and {split}.de have different line counts")
    train_total = len(raw["train", "en"])
    chosen = np.sort(np.random.default_rng(SEED).permutation(train_total)[:TRAIN_PAIRS])
    OUT.mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        _write(OUT / f"train.{lang}.gz", [raw["train", lang][i] for i in chosen])
        _write(OUT / f"val.{lang}.gz", raw["val", lang][:VAL_PAIRS])
        _write(OUT / f"test.{lang}.gz", raw["test_2016_flickr", lang])
    (OUT / "NOTICE.md").write_text(NOTICE.format(
        train=TRAIN_PAIRS, train_total=train_total, seed=SEED, val=VAL_PAIRS, val_total=len(raw["val", "en"]),
        test_total=len(raw["test_2016_flickr", "en"])), encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total:,} bytes)")


if __name__ == "__main__":
    main()
