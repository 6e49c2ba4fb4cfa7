"""Subword tokenizer: a thin wrapper over a HuggingFace `tokenizers.Tokenizer` with fixed special ids."""

from __future__ import annotations

import hashlib
import os
import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from crosswrite_jax.errors import UserError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
_RUNTIME_KEYS = ("truncation", "padding")  # encode-time settings, not part of what a tokenizer is


class Tokenizer:
    """Joint source/target subword vocabulary with pad/eos/unk ids."""

    def __init__(self, tokenizer: _HFTokenizer, pad_id: int = PAD_ID, eos_id: int = EOS_ID,
                 unk_id: int | None = UNK_ID) -> None:
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self._pad_id, self._eos_id, self._unk_id = pad_id, eos_id, unk_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model: str = "bpe") -> Tokenizer:
        """Trains a BPE or Unigram vocabulary (Metaspace, NFKC) on the texts, deterministically."""
        texts = list(texts)
        if model == "bpe":
            tok = _HFTokenizer(models.BPE(unk_token=UNK))
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                          show_progress=False)
        elif model == "unigram":
            tok = _HFTokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                              unk_token=UNK, show_progress=False)
        else:
            raise UserError(f"config key 'data.tokenizer_model' is {model!r}; choose one of bpe, unigram")
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tok.train_from_iterator(texts, trainer=trainer)
        if model == "unigram":
            tok.model = _rescore_unigram(tok, texts)
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        assert ids == [PAD_ID, EOS_ID, UNK_ID], ids
        return cls(tok)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Loads tokenizer.json from a directory saved by `save` or any HF tokenizer directory."""
        directory = Path(directory).expanduser()
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"data.tokenizer '{directory}' holds no tokenizer.json; pass a directory written by "
                            f"a crosswrite run or a HuggingFace fast-tokenizer directory, or leave it empty")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as error:  # a corrupt file is bad input
            raise UserError(f"{path}: not a valid tokenizer.json ({error})") from None
        names = _special_token_names(directory)
        ids = {}
        for role, default in (("pad", PAD), ("eos", EOS), ("unk", UNK)):
            name = names.get(role, default)
            ids[role] = tok.token_to_id(name) if name is not None else None
        for role in ("pad", "eos"):
            if ids[role] is None:
                raise UserError(f"tokenizer '{directory}' has no {role} token (looked in tokenizer_config.json, "
                                f"special_tokens_map.json and for '{dict(pad=PAD, eos=EOS)[role]}'); "
                                f"use a tokenizer with pad and eos tokens, or leave data.tokenizer empty")
        return cls(tok, ids["pad"], ids["eos"], ids["unk"])

    def save(self, directory: str | Path) -> None:
        """Writes HF format (tokenizer.json + tokenizer_config.json) loadable by AutoTokenizer."""
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" notice
        from transformers import PreTrainedTokenizerFast  # heavy: only needed here

        kwargs = {"pad_token": self._tok.id_to_token(self._pad_id), "eos_token": self._tok.id_to_token(self._eos_id)}
        if self._unk_id is not None:
            kwargs["unk_token"] = self._tok.id_to_token(self._unk_id)
        Path(directory).mkdir(parents=True, exist_ok=True)
        PreTrainedTokenizerFast(tokenizer_object=self._tok, **kwargs).save_pretrained(str(directory))
        # The canonical file is ours: the HF writer may add runtime settings; keep the fingerprint stable.
        (Path(directory) / "tokenizer.json").write_text(self._tok.to_str(pretty=True), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self._pad_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id (None if the tokenizer has none)."""
        return self._unk_id

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the canonical tokenizer.json: equal for equal tokenizers, across save/load."""
        data: dict[str, Any] = json.loads(self._tok.to_str())
        for key in _RUNTIME_KEYS:
            data.pop(key, None)
        data = json.loads(json.dumps(data), parse_float=lambda x: format(float(x), ".8g"))  # float-parse drift
        canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode_batch(self, ids: list[list[int]] | np.ndarray) -> list[str]:
        """Text of each row, cut at the first EOS, padding and special tokens dropped."""
        rows = ids.tolist() if isinstance(ids, np.ndarray) else [list(map(int, row)) for row in ids]
        cut = []
        for row in rows:
            if self._eos_id in row:
                row = row[:row.index(self._eos_id)]
            cut.append([i for i in row if i != self._pad_id])
        return self._tok.decode_batch(cut, skip_special_tokens=True)


def _special_token_names(directory: Path) -> dict[str, str | None]:
    """pad/eos/unk token strings declared by a HF tokenizer directory (roles it declares only)."""
    names: dict[str, str | None] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / filename
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: unreadable ({error})") from None
        for role in ("pad", "eos", "unk"):
            if role in names or f"{role}_token" not in config:
                continue
            value = config[f"{role}_token"]
            names[role] = value.get("content") if isinstance(value, dict) else value
    return names



def _rescore_unigram(tok: _HFTokenizer, texts: list[str], iterations: int = 3) -> models.Unigram:
    """Deterministic Unigram scores for the trained piece set (the HF trainer's EM varies run to run).

    Seeds each piece with log(substring frequency * length), then runs hard (Viterbi) EM over the word
    counts; pieces are ordered by (-score, piece) after the special tokens.
    """
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    pieces = sorted(p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in SPECIAL_TOKENS)
    piece_set, longest = set(pieces), max(map(len, pieces))
    counts: Counter[str] = Counter()
    for word, n in words.items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + longest) + 1):
                if word[i:j] in piece_set:
                    counts[word[i:j]] += n * (j - i)
    unique = sorted(words)
    for step in range(iterations + 1):
        total = sum(counts.values()) + len(pieces)
        scores = {p: round(math.log((counts[p] + 0.5) / total), 6) for p in pieces}
        ordered = sorted(pieces, key=lambda p: (-scores[p], p))
        unigram = models.Unigram([(t, 0.0) for t in SPECIAL_TOKENS] + [(p, scores[p]) for p in ordered], UNK_ID)
        if step == iterations:
            return unigram
        counts = Counter()
        for word, encoding in zip(unique, _HFTokenizer(unigram).encode_batch_fast(unique, add_special_tokens=False)):
            for token in encoding.tokens:
                counts[token] += words[word]
    raise AssertionError("unreachable")
