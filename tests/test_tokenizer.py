"""Tokenizer training with mask/sentinel specials, HF directories, and `crosswrite tokenizer train`."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import unicodedata

import pytest

from crosswrite_jax import cli
from crosswrite_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_from_files
from crosswrite_jax.errors import UserError

_SUBJECTS = ("A young man", "Two dogs", "The old woman", "A little girl", "Three children", "My neighbour",
             "Ein Mann", "Die Frau", "Zwei Hunde", "A café owner")
_VERBS = ("is walking", "are playing", "sits", "runs quickly", "waits patiently", "spielt", "läuft",
          "is reading a book", "looks at the sky", "talks on the phone")
_PLACES = ("in the park.", "near the river!", "on a busy street, downtown.", "at 5 o'clock?", "im Garten.",
           "by the lake (again).", "with 2 friends; it's sunny.", "über die Brücke.",
           "at the market: apples & pears.", "under a \"big\" tree.")
_EXTRA = ("Is it 10:30 already?", "She said: \"No, thanks!\"", "The ﬁrst ﬂoor is closed.",
          "Ｆｕｌｌ width text.",
          "Prices rose by 3.5% in 2023.", "Wer hat das gemacht?", "e-mail me at home, please...",
          "Ça va très bien, merci.", "Don't stop -- keep going.", "[brackets] and {braces} / slashes")


def _corpus() -> list[str]:
    """210 varied sentences (English/German, digits, punctuation, accents, NFKC-changed forms), fixed order."""
    combos = itertools.product(range(len(_SUBJECTS)), range(len(_VERBS)), range(len(_PLACES)))
    out = [f"{_SUBJECTS[s]} {_VERBS[v]} {_PLACES[p]}" for n, (s, v, p) in enumerate(combos)
           if (s * 7 + v * 3 + p) % 5 == n % 5]
    return out + list(_EXTRA)


CORPUS = _corpus()
MODELS = ("bpe", "unigram", "wordpiece")
# Fingerprints measured with the tokenizer code from BEFORE mask/sentinels/wordpiece existed (vocab 300 on
# CORPUS): the default tokenizer must not change, existing checkpoints depend on it.
PINNED = {"bpe": "0a314f6363cec9b8b89999c879d402f6d2cd2137aec1fb315ccc4adccd103116",
          "unigram": "cf962bc4fa3e6c244ae6b172b3d5a13a703e11fc619f90801416a76d55de2b33"}


def _words(text: str) -> list[str]:
    """Words and punctuation marks: equality modulo whitespace around punctuation."""
    return re.findall(r"\w+|[^\w\s]", unicodedata.normalize("NFKC", text))


@pytest.fixture(scope="module")
def trained() -> dict[str, Tokenizer]:
    return {m: Tokenizer.train(CORPUS, 300, m, mask=True, sentinels=3) for m in MODELS}


def test_default_tokenizers_keep_their_pre_change_fingerprints():
    assert CORPUS[0] == "A young man is walking in the park." and len(CORPUS) == 210
    for model, fingerprint in PINNED.items():
        tok = Tokenizer.train(CORPUS, 300, model)
        assert tok.fingerprint == fingerprint, model
        assert Tokenizer.train(CORPUS, 300, model, mask=False, sentinels=0).fingerprint == fingerprint
        assert (tok.mask_id, tok.sentinel_ids) == (None, ())


@pytest.mark.parametrize("model", MODELS)
def test_specials_ids_round_trip_and_determinism(trained, model):
    tok = trained[model]
    hf = tok._tok
    assert [hf.id_to_token(i) for i in range(7)] == [
        "<pad>", "</s>", "<unk>", "<mask>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id, tok.sentinel_ids) == (PAD_ID, EOS_ID, UNK_ID, 3, (4, 5, 6))
    assert tok.vocab_size <= 300
    ids = tok.encode_batch(CORPUS)
    assert not any(i in (0, 1, 3, 4, 5, 6) for row in ids for i in row)  # ordinary text never yields specials
    decoded = tok.decode_batch(ids)
    if model == "wordpiece":  # BERT-style: spaces around punctuation, otherwise the same text
        assert [_words(d) for d in decoded] == [_words(t) for t in CORPUS]
        assert decoded[0] == CORPUS[0] and decoded[1] == CORPUS[1]  # "park." / "river!" stay readable
    else:
        assert decoded == [unicodedata.normalize("NFKC", t) for t in CORPUS]
    assert Tokenizer.train(CORPUS, 300, model, mask=True, sentinels=3).fingerprint == tok.fingerprint
    assert Tokenizer.train(CORPUS, 300, model, mask=True).sentinel_ids == ()
    no_mask = Tokenizer.train(CORPUS, 300, model, sentinels=2)
    assert (no_mask.mask_id, no_mask.sentinel_ids) == (None, (3, 4))


@pytest.mark.parametrize("model", MODELS)
def test_literal_special_strings(trained, model):
    """A literal "<mask>"/"<extra_id_K>" (also after NFKC) is that one id, never split; look-alikes are text."""
    tok = trained[model]
    [row] = tok.encode_batch(["The <extra_id_0> walks in <mask> park<extra_id_2>."])
    assert [i for i in row if i < 7] == [4, 3, 6]
    assert tok.encode_batch(["＜mask＞"])[0].count(3) == 1  # full width: NFKC gives "<mask>"
    for text in ("mask", "extra_id_0", "<mask", "mask>", "<extra_id_3>", "< mask >", "<MASK>"):
        assert not set(tok.encode_batch([text])[0]) & {0, 1, 3, 4, 5, 6}, text
    decoded = tok.decode_batch([row])[0]  # decode drops them
    assert "<" not in decoded and "extra" not in decoded and "mask" not in decoded
    assert _words(decoded) == _words("The walks in park.")


def test_decode_skips_mask_and_sentinels_and_cuts_at_eos(trained):
    tok = trained["bpe"]
    [ids] = tok.encode_batch(["Two dogs sits in the park."])
    row = [tok.mask_id, *ids[:2], *tok.sentinel_ids, *ids[2:], EOS_ID, tok.mask_id, *ids, PAD_ID]
    assert tok.decode_batch([row]) == ["Two dogs sits in the park."]


@pytest.mark.parametrize("model", MODELS)
def test_save_load_and_auto_tokenizer_keep_mask_and_sentinels(trained, model, tmp_path):
    tok = trained[model]
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == tok.fingerprint
    assert (loaded.mask_id, loaded.sentinel_ids, loaded.vocab_size) == (3, (4, 5, 6), tok.vocab_size)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.mask_token, auto.mask_token_id, auto.pad_token_id, auto.eos_token_id) == ("<mask>", 3, 0, 1)
    assert {4, 5, 6} <= set(auto.all_special_ids)
    text = "A young man <mask> in the park <extra_id_1>."
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode_batch([text])[0]
    if model != "wordpiece":
        assert auto.decode(tok.encode_batch([CORPUS[5]])[0]) == CORPUS[5]


def test_load_finds_sentinels_of_a_t5_like_directory(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁b", -2.0), ("a", -3.0), ("b", -3.0),
              ("▁", -4.0)]
    hf = HFTokenizer(models.Unigram(pieces, 2))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    hf.add_special_tokens(["<pad>", "</s>", "<unk>", "<extra_id_2>", "<extra_id_1>", "<extra_id_0>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 3,
         "additional_special_tokens": ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]}))
    tok = Tokenizer.load(tmp_path)
    assert tok.sentinel_ids == (10, 9, 8)  # extra_id_0 has the highest id
    assert tok.mask_id is None
    assert tok.encode_batch(["a <extra_id_0> b"])[0] == [3, 7, 10, 4]
    assert tok.decode_batch([[3, 10, 4, 1, 5]]) == ["a b"]


def test_load_finds_a_declared_mask_token(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "hello": 5, "<mask>": 6}
    HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    config = {"pad_token": "[PAD]", "eos_token": "[SEP]", "unk_token": "[UNK]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(tmp_path).mask_id == 6  # undeclared: found by the name <mask>
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"mask_token": {"content": "[MASK]"}}))
    bert = Tokenizer.load(tmp_path)
    assert (bert.mask_id, bert.sentinel_ids, bert.eos_id) == (4, (), 3)


def test_bad_arguments():
    with pytest.raises(UserError, match="too small for the 104 special tokens"):
        Tokenizer.train(CORPUS, 104, "bpe", mask=True, sentinels=100)
    with pytest.raises(UserError, match="choose one of bpe, unigram, wordpiece"):
        Tokenizer.train(CORPUS, 300, "sentencepiece")


def test_train_from_files_reads_globs_gzip_and_max_lines(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("\n".join(CORPUS[100:]) + "\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(CORPUS[:100]) + "\n")
    monkeypatch.chdir(tmp_path)
    tok = train_from_files(["*.gz", "*.txt"], 300, "bpe", mask=False, sentinels=0)
    assert tok.fingerprint == PINNED["bpe"]  # same texts, same order: same tokenizer
    few = train_from_files(["*.gz"], 300, "unigram", mask=True, sentinels=2, max_lines=10)
    assert (few.mask_id, few.sentinel_ids) == (3, (4, 5))
    assert few.vocab_size < Tokenizer.train(CORPUS, 300, "unigram", mask=True, sentinels=2).vocab_size


# ---------------------------------------------------------------- crosswrite tokenizer train

def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_cli_tokenizer_train_writes_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "one.txt").write_text("\n".join(CORPUS[:120]), encoding="utf-8")
    with gzip.open(tmp_path / "data" / "two.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(CORPUS[120:]))
    monkeypatch.chdir(tmp_path)
    args = ["tokenizer", "train", "--input", "data/*.txt", "--input", "data/*.gz", "--vocab-size", "400",
            "--model", "unigram", "--out", "tok", "--sentinels", "5"]
    assert cli.main(args) == 0
    record = json.loads(_last_line(capsys.readouterr().out))
    assert {k: record[k] for k in ("model", "mask_id", "sentinels", "out")} == {
        "model": "unigram", "mask_id": 3, "sentinels": 5, "out": "tok"}
    assert record["vocab_size"] <= 400 and record["seconds"] >= 0
    saved = Tokenizer.load(tmp_path / "tok")
    assert (saved.mask_id, saved.sentinel_ids, saved.vocab_size) == (3, (4, 5, 6, 7, 8), record["vocab_size"])
    first = (tmp_path / "tok" / "tokenizer.json").read_bytes()

    assert cli.main([*args[:-4], "--model", "bpe", "--out", "tok"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a tokenizer.json" in err and "--force" in err
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == first

    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "[SEP]"}))  # stale
    assert cli.main([*args[:-6], "--model", "bpe", "--out", "tok", "--no-mask", "--force", "--sentinels", "0"]) == 0
    assert json.loads(_last_line(capsys.readouterr().out))["mask_id"] is None
    replaced = Tokenizer.load(tmp_path / "tok")
    assert (replaced.mask_id, replaced.sentinel_ids) == (None, ())
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_cli_tokenizer_train_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["tokenizer", "train", "--vocab-size", "300", "--model", "wordpiece", "--out", "tok"]

    assert cli.main([*base, "--input", "missing/*.txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'missing/*.txt' matches no files" in err

    (tmp_path / "good.txt").write_text("hello world\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("fine\nCafé crème\n".encode("latin-1"))
    assert cli.main([*base, "--input", "*.txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latin1.txt:2: not UTF-8" in err and "Traceback" not in err

    (tmp_path / "blank.text").write_text("\n  \n", encoding="utf-8")
    assert cli.main([*base, "--input", "blank.text"]) == 2
    assert "holds no text" in capsys.readouterr().err

    assert cli.main([*base[:2], "--vocab-size", "50", *base[4:], "--input", "good.txt"]) == 2
    assert "too small for the 104 special tokens" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()
