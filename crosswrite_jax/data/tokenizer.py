"""Subword tokenizer: a thin wrapper over a HuggingFace `tokenizers.Tokenizer` with fixed special ids."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from crosswrite_jax.data import files
from crosswrite_jax.errors import UserError

PAD_ID = 0  # padding, and the decoder's start token (models import it from here)
EOS_ID = 1
UNK_ID = 2
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
MASK = "<mask>"
SENTINEL = "<extra_id_{}>"  # T5's span-corruption sentinels: <extra_id_0>, <extra_id_1>, ...
MODELS = ("bpe", "unigram", "wordpiece")
_RUNTIME_KEYS = ("truncation", "padding")  # encode-time settings, not part of what a tokenizer is


class Tokenizer:
    """Joint source/target subword vocabulary with pad/eos/unk ids."""

    def __init__(self, tokenizer: _HFTokenizer, pad_id: int = PAD_ID, eos_id: int = EOS_ID,
                 unk_id: int | None = UNK_ID, mask_id: int | None = None,
                 sentinel_ids: Iterable[int] = ()) -> None:
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self._pad_id, self._eos_id, self._unk_id = pad_id, eos_id, unk_id
        self._mask_id, self._sentinel_ids = mask_id, tuple(sentinel_ids)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model: str = "bpe", *, mask: bool = False,
              sentinels: int = 0) -> Tokenizer:
        """Trains a BPE, Unigram or WordPiece vocabulary (NFKC) on the texts, deterministically.

        Special tokens come first: <pad> 0, </s> 1, <unk> 2, then <mask> (if `mask`), then <extra_id_0> ..
        <extra_id_{sentinels-1}>. They are atomic added tokens: encoding never splits them and text without them
        never yields them, but a literal special string in the text (e.g. "<mask>", "<extra_id_0>") encodes to
        its id, as in HF tokenizers (AutoTokenizer does the same), so "a <extra_id_0> b" is T5-style input.
        Mask and sentinels are matched after NFKC (so "＜mask＞" counts as "<mask>"); pad/eos/unk on the raw
        text, as before (a Unigram model can still map an NFKC form such as "＜/s＞" to eos).
        BPE/Unigram use a Metaspace pre-tokenizer and decode back to the (NFKC-normalized) text; WordPiece splits
        on whitespace and punctuation (BERT style) and decodes with spaces around most punctuation ("( again )").
        With mask=False, sentinels=0 the result is the same as before these options existed (same fingerprint).
        """
        texts = list(texts)
        specials = special_tokens(mask, sentinels)
        # Mask and sentinels match on NFKC-normalized text: every occurrence is cut out before the model runs,
        # so no model (e.g. Unigram's Viterbi on a full-width "＜mask＞") can produce them from other text.
        added = [*SPECIAL_TOKENS,
                 *(AddedToken(t, special=True, normalized=True) for t in specials[len(SPECIAL_TOKENS):])]
        if model not in MODELS:
            raise UserError(f"config key 'data.tokenizer_model' is {model!r}; choose one of {', '.join(MODELS)}")
        _check_vocab_size(vocab_size, mask, sentinels)
        if model == "wordpiece":
            tok = _train_wordpiece(texts, vocab_size, added)
        else:
            if model == "bpe":
                tok = _HFTokenizer(models.BPE(unk_token=UNK))
                trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=added, show_progress=False)
            else:
                tok = _HFTokenizer(models.Unigram())
                trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=added,
                                                  unk_token=UNK, show_progress=False)
            tok.normalizer = normalizers.NFKC()
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
            tok.train_from_iterator(texts, trainer=trainer)
            if model == "unigram":
                tok.model = _rescore_unigram(tok, texts, specials)
        ids = [tok.token_to_id(t) for t in specials]
        assert ids == list(range(len(specials))), ids
        return cls(tok, mask_id=ids[len(SPECIAL_TOKENS)] if mask else None,
                   sentinel_ids=ids[len(specials) - sentinels:])

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
        mask = names.get("mask", MASK)
        mask_id = tok.token_to_id(mask) if mask is not None else None
        return cls(tok, ids["pad"], ids["eos"], ids["unk"], mask_id, _sentinel_ids(tok))

    def save(self, directory: str | Path) -> None:
        """Writes HF format (tokenizer.json + tokenizer_config.json) loadable by AutoTokenizer."""
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" notice
        from transformers import PreTrainedTokenizerFast  # heavy: only needed here

        kwargs = {"pad_token": self._tok.id_to_token(self._pad_id), "eos_token": self._tok.id_to_token(self._eos_id)}
        if self._unk_id is not None:
            kwargs["unk_token"] = self._tok.id_to_token(self._unk_id)
        if self._mask_id is not None:
            kwargs["mask_token"] = self._tok.id_to_token(self._mask_id)
        if self._sentinel_ids:  # transformers 5 stores these as extra_special_tokens
            kwargs["additional_special_tokens"] = [self._tok.id_to_token(i) for i in self._sentinel_ids]
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
    def mask_id(self) -> int | None:
        """Mask id (<mask>, or the mask_token a loaded HF directory declares, e.g. BERT's [MASK]); None if none."""
        return self._mask_id

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        """Ids of <extra_id_0>, <extra_id_1>, ... in that order (T5 puts them at the end, extra_id_0 highest)."""
        return self._sentinel_ids

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
        dropped = {self._pad_id, self._mask_id, *self._sentinel_ids}
        cut = []
        for row in rows:
            if self._eos_id in row:
                row = row[:row.index(self._eos_id)]
            cut.append([i for i in row if i not in dropped])
        return self._tok.decode_batch(cut, skip_special_tokens=True)

    def encode_for_model(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Ids of each text as an encoder model takes it, at most `max_length` ids.

        A tokenizer with special-token post-processing (BERT's "[CLS] text [SEP]") gets it, the text truncated so
        that the special tokens stay; one without (those `train` makes) gets the text truncated and EOS appended.
        """
        return [ids for ids, _ in self._encode_with_specials(list(texts), max_length, words=False)]

    def encode_words(self, word_lists: list[list[str]], max_length: int) -> list[tuple[list[int], list[int | None]]]:
        """(ids, word index per id) of each pre-split sentence, special tokens and truncation as `encode_for_model`.

        The word index is the position of the word (in its list) a token comes from; None for special tokens.
        Words cut off by truncation, or that yield no token (e.g. empty), have no index in the result.
        """
        return self._encode_with_specials([list(words) for words in word_lists], max_length, words=True)

    def _encode_with_specials(self, inputs: list, max_length: int,
                              words: bool) -> list[tuple[list[int], list[int | None]]]:
        if max_length < 2:
            raise UserError(f"max length {max_length} leaves no room for a token and the special tokens; "
                            f"use at least 2 (config key data.max_length)")
        encode = self._tok.encode_batch if words else self._tok.encode_batch_fast  # fast: no word ids needed
        if self._tok.post_processor is None:
            encodings = encode(inputs, is_pretokenized=words, add_special_tokens=False)
            return [(e.ids[:max_length - 1] + [self._eos_id], [*e.word_ids[:max_length - 1], None])
                    for e in encodings]
        previous = self._tok.truncation
        try:
            self._tok.enable_truncation(max_length)
            encodings = encode(inputs, is_pretokenized=words, add_special_tokens=True)
        except Exception as error:  # e.g. max_length below the number of special tokens
            raise UserError(f"cannot encode to max length {max_length} ({error}); raise data.max_length") from None
        finally:
            if previous is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(**previous)
        return [(e.ids, list(e.word_ids)) for e in encodings]


def train_from_files(patterns: Iterable[str], vocab_size: int, model: str = "bpe", mask: bool = True,
                     sentinels: int = 100, max_lines: int | None = None) -> Tokenizer:
    """Trains a tokenizer on UTF-8 text files (one text per line, .gz allowed) matched by the glob patterns.

    Relative patterns are taken from the current directory; blank lines are skipped; at most `max_lines`
    texts are read (in sorted file order). Bad input raises UserError naming the pattern or file.
    """
    if model not in MODELS:
        raise UserError(f"tokenizer model {model!r} is unknown; choose one of {', '.join(MODELS)}")
    _check_vocab_size(vocab_size, mask, sentinels)  # before reading: fail fast
    return Tokenizer.train(read_lines(patterns, max_lines), vocab_size, model, mask=mask, sentinels=sentinels)


def _check_vocab_size(vocab_size: int, mask: bool, sentinels: int) -> None:
    specials = special_tokens(mask, sentinels)
    if vocab_size <= len(specials):
        raise UserError(f"vocab size {vocab_size} is too small for the {len(specials)} special tokens "
                        f"(pad, eos, unk{', mask' if mask else ''}, {sentinels} sentinels); use a vocab size "
                        f"well above {len(specials)} or fewer sentinels")


def check_output(directory: str | Path, force: bool = False) -> Path:
    """The output directory, if a tokenizer may be saved there (UserError if it holds one and not `force`)."""
    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' is a file; pass a directory for the tokenizer")
    if (out / "tokenizer.json").exists() and not force:
        raise UserError(f"output '{out}' already holds a tokenizer.json; choose another directory or pass --force "
                        f"to replace it")
    return out


def save_new(tokenizer: Tokenizer, directory: str | Path, force: bool = False, files_from: Path | None = None) -> Path:
    """Saves into `directory`, refusing (UserError) if it already holds a tokenizer.json unless `force`.

    With `force` the old tokenizer files are replaced together: the files are written to a temporary
    folder inside it, stale HF tokenizer files `save` does not write are removed, then tokenizer.json last.
    `files_from`: a folder `save` already wrote for this tokenizer, whose files are copied instead.
    """
    out = check_output(directory, force)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))
    try:
        if files_from is None:
            tokenizer.save(staging)
        else:
            for file in files_from.iterdir():
                if file.is_file():
                    shutil.copyfile(file, staging / file.name)
        for stale in ("special_tokens_map.json", "added_tokens.json"):  # would override the new specials
            if not (staging / stale).exists():
                (out / stale).unlink(missing_ok=True)
        written = sorted(staging.iterdir(), key=lambda f: f.name == "tokenizer.json")
        for file in written:
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_lines(patterns: Iterable[str], max_lines: int | None = None) -> list[str]:
    """The non-blank lines of the files the glob patterns match, each pattern's files in sorted order."""
    patterns = list(patterns)
    if not patterns:
        raise UserError("no input files given; pass --input GLOB (e.g. --input 'data/*.txt')")
    if max_lines is not None and max_lines < 1:
        raise UserError(f"max lines is {max_lines}; use a positive number or leave it out")
    paths: list[Path] = []
    for pattern in patterns:
        matched = files.resolve_paths(pattern, label=f"input '{pattern}'", env=False)  # relative to the cwd
        paths.extend(p for p in map(Path, matched) if p not in paths)
    lines: list[str] = []
    for path in paths:
        if max_lines is not None and len(lines) >= max_lines:
            break
        for line in files.iter_lines(path, allow_empty=True):  # streamed: max_lines reads no more than it needs
            if line.strip():
                lines.append(line)
                if max_lines is not None and len(lines) >= max_lines:
                    break
    if not lines:
        raise UserError(f"input {', '.join(repr(p) for p in patterns)} holds no text ({len(paths)} file(s), "
                        f"all blank); pass files with one text per line")
    return lines


def special_tokens(mask: bool = False, sentinels: int = 0) -> list[str]:
    """The special tokens of a trained tokenizer, in id order."""
    if sentinels < 0:
        raise UserError(f"the number of sentinels is {sentinels}; use 0 or more")
    return [*SPECIAL_TOKENS, *([MASK] if mask else []), *(SENTINEL.format(k) for k in range(sentinels))]


def _sentinel_ids(tok: _HFTokenizer) -> tuple[int, ...]:
    """Ids of <extra_id_0>, <extra_id_1>, ... up to the first one missing."""
    ids = []
    while (i := tok.token_to_id(SENTINEL.format(len(ids)))) is not None:
        ids.append(i)
    return tuple(ids)


def _special_token_names(directory: Path) -> dict[str, str | None]:
    """pad/eos/unk/mask token strings declared by a HF tokenizer directory (roles it declares only)."""
    names: dict[str, str | None] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / filename
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: unreadable ({error})") from None
        for role in ("pad", "eos", "unk", "mask", "sep"):
            if role in names or f"{role}_token" not in config:
                continue
            value = config[f"{role}_token"]
            names[role] = value.get("content") if isinstance(value, dict) else value
    if "eos" not in names and names.get("sep"):  # BERT-style vocabularies end a sequence with [SEP]
        names["eos"] = names["sep"]
    return names



def _train_wordpiece(texts: list[str], vocab_size: int, added: list) -> _HFTokenizer:
    """A WordPiece tokenizer (NFKC, BERT pre-tokenizer, "##" continuations), trained deterministically.

    HF's WordPieceTrainer numbers the "##" pieces in hash-map order, so ties between merges (and with them the
    vocabulary) vary run to run. Instead a BPE is trained on the same words with a word-start marker (its
    alphabet is sorted, so it is deterministic), then converted: "<marker>abc" -> "abc", "abc" -> "##abc".
    Every character is kept both word-initially and as "##c"; learned pieces follow in merge order up to
    `vocab_size`.
    """
    marker = "\ue000"  # private use: absent from real text
    bpe = _HFTokenizer(models.BPE(unk_token=UNK))
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace(replacement=marker, prepend_scheme="always")])
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=added,
                                                               show_progress=False))
    learned = sorted(bpe.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    specials = [str(t) if isinstance(t, str) else t.content for t in added]
    alphabet = sorted({c for piece, _ in learned if piece not in specials for c in piece if c != marker})
    vocab: dict[str, int] = {}
    for piece in [*specials, *alphabet, *(f"##{c}" for c in alphabet)]:
        vocab.setdefault(piece, len(vocab))
    for piece, _ in learned:
        if len(vocab) >= vocab_size:
            break
        if piece in specials or piece == marker:
            continue
        vocab.setdefault(piece[1:] if piece.startswith(marker) else f"##{piece}", len(vocab))
    tok = _HFTokenizer(models.WordPiece(vocab, unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(added)
    return tok


def _rescore_unigram(tok: _HFTokenizer, texts: list[str], specials: list[str],
                     iterations: int = 3) -> models.Unigram:
    """Deterministic Unigram scores for the trained piece set (the HF trainer's EM varies run to run).

    Seeds each piece with log(substring frequency * length), then runs hard (Viterbi) EM over the word
    counts; pieces are ordered by (-score, piece) after the special tokens.
    """
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    pieces = sorted(p for p, _ in json.loads(tok.to_str())["model"]["vocab"] if p not in specials)
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
        unigram = models.Unigram([(t, 0.0) for t in specials] + [(p, scores[p]) for p in ordered], UNK_ID)
        if step == iterations:
            return unigram
        counts = Counter()
        for word, encoding in zip(unique, _HFTokenizer(unigram).encode_batch_fast(unique, add_special_tokens=False)):
            for token in encoding.tokens:
                counts[token] += words[word]
    raise AssertionError("unreachable")


CACHE_ENV = "CROSSWRITE_TOKENIZER_CACHE"  # where trained tokenizers are kept; the empty string turns the cache off


def tokenizer_cache_dir() -> Path | None:
    """$CROSSWRITE_TOKENIZER_CACHE, else $XDG_CACHE_HOME/crosswrite_jax/tokenizers (~/.cache by default); None: off."""
    from crosswrite_jax.compile_cache import cache_home

    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]).expanduser() if os.environ[CACHE_ENV] else None
    return cache_home() / "tokenizers"


def train_cached(texts: list[str], vocab_size: int, model: str = "bpe", *, mask: bool = False,
                 sentinels: int = 0) -> tuple[Tokenizer, Path | None]:
    """`Tokenizer.train`, kept in the tokenizer cache under a hash of its texts, settings, this module's code and
    the tokenizers version: (the tokenizer, the cached folder `save` wrote for it, or None with the cache off).

    Training is deterministic, so a cached tokenizer is the one training would give again (the same fingerprint).
    """
    import tokenizers

    cache = tokenizer_cache_dir()
    if cache is None:
        return Tokenizer.train(texts, vocab_size, model, mask=mask, sentinels=sentinels), None
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(json.dumps([vocab_size, model, mask, sentinels, tokenizers.__version__]).encode())
    for text in texts:
        key.update(text.encode("utf-8", "surrogatepass") + b"\0")
    folder = cache / key.hexdigest()[:32]
    if (folder / "tokenizer.json").is_file():
        try:
            return Tokenizer.load(folder), folder
        except Exception:  # noqa: BLE001 - a damaged entry is trained again and replaced
            pass
    tokenizer = Tokenizer.train(texts, vocab_size, model, mask=mask, sentinels=sentinels)
    try:
        save_new(tokenizer, folder, force=True)
    except OSError:
        return tokenizer, None
    return tokenizer, folder
