"""Data side: bundled sample, tokenizer, training and eval pipelines (bundled sample and synthetic data only)."""

from __future__ import annotations

import gzip
import json
import unicodedata

import numpy as np
import pytest

from crosswrite_jax.data.pipeline import eval_batches, packed_train_dataset, padding_fraction, train_dataset
from crosswrite_jax.data.sources import read_parallel
from crosswrite_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from crosswrite_jax.errors import UserError

BUCKETS = (16, 32, 48, 64)


@pytest.fixture(scope="module")
def sample_train() -> list[tuple[str, str]]:
    return read_parallel("multi30k_sample", "train", "en", "de")


@pytest.fixture(scope="module")
def small_tokenizer(sample_train) -> Tokenizer:
    pairs = sample_train[:250]
    return Tokenizer.train([s for pair in pairs for s in pair], vocab_size=1000)


@pytest.fixture(scope="module")
def sample_tokenizer(sample_train) -> Tokenizer:
    return Tokenizer.train([s for pair in sample_train for s in pair], vocab_size=4000)


def _train(pairs, tokenizer, **overrides):
    kwargs = dict(global_batch_size=32, max_source_length=64, max_target_length=64, bucket_lengths=BUCKETS,
                  seed=0, length_grouping_window=16)
    kwargs.update(overrides)
    return train_dataset(pairs, tokenizer, **kwargs)


# ---------------------------------------------------------------- sources

@pytest.mark.parametrize("split,count", [("train", 8000), ("val", 500), ("test", 1000)])
def test_bundled_sample_counts(split, count):
    pairs = read_parallel("multi30k_sample", split, "en", "de")
    assert len(pairs) == count
    assert all(isinstance(s, str) and isinstance(t, str) for s, t in pairs)
    assert not any(s.endswith("\n") or t.endswith("\n") for s, t in pairs)
    assert read_parallel("multi30k_sample", split, "de", "en")[0] == pairs[0][::-1]


def test_read_parallel_max_examples(sample_train):
    assert read_parallel("multi30k_sample", "train", "en", "de", max_examples=7) == sample_train[:7]


def test_read_parallel_directory_gz_and_test_alias(tmp_path):
    (tmp_path / "test_2016_flickr.en").write_text("a b\nc  d \n", encoding="utf-8")
    with gzip.open(tmp_path / "test_2016_flickr.fr.gz", "wt", encoding="utf-8") as f:
        f.write("x\ny\n")
    assert read_parallel(str(tmp_path), "test", "en", "fr") == [("a b", "x"), ("c  d ", "y")]


def test_read_parallel_missing_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="nowhere"):
        read_parallel(str(missing), "train", "en", "de")
    (tmp_path / "train.en").write_text("a\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_parallel(str(tmp_path), "train", "en", "de")
    assert str(tmp_path) in str(info.value) and "train.de" in str(info.value) and "train.de.gz" in str(info.value)
    with pytest.raises(UserError, match="dev.en"):
        read_parallel("multi30k_sample", "dev", "en", "de")


def test_read_parallel_count_mismatch_and_empty(tmp_path):
    (tmp_path / "train.en").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_parallel(str(tmp_path), "train", "en", "de")
    message = str(info.value)
    assert "train.en" in message and "train.de" in message and "2" in message and "1" in message
    (tmp_path / "val.en").write_text("", encoding="utf-8")
    (tmp_path / "val.de").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        read_parallel(str(tmp_path), "val", "en", "de")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_special_ids_and_round_trip(small_tokenizer, sample_train):
    tok = small_tokenizer
    assert (tok.pad_id, tok.eos_id, PAD_ID, EOS_ID, UNK_ID) == (0, 1, 0, 1, 2)
    assert tok.vocab_size == 1000
    texts = [s for pair in sample_train[:250] for s in pair if unicodedata.normalize("NFKC", s) == s]
    ids = tok.encode_batch(texts)
    assert all(EOS_ID not in row and PAD_ID not in row for row in ids)
    assert tok.decode_batch(ids) == texts


def test_tokenizer_decode_cuts_at_eos(small_tokenizer):
    ids = small_tokenizer.encode_batch(["A dog runs.", "Ein Hund."])
    rows = np.full((2, 20), PAD_ID, dtype=np.int32)
    rows[0, :len(ids[0])] = ids[0]
    rows[0, len(ids[0])] = EOS_ID
    rows[0, len(ids[0]) + 1:len(ids[0]) + 3] = ids[1][:2]  # garbage after EOS is ignored
    rows[1, :len(ids[1])] = ids[1]
    assert small_tokenizer.decode_batch(rows) == ["A dog runs.", "Ein Hund."]


def test_tokenizer_deterministic_and_unigram(sample_train):
    texts = [s for pair in sample_train[:150] for s in pair]
    assert Tokenizer.train(texts, 600).fingerprint == Tokenizer.train(texts, 600).fingerprint
    first, second = Tokenizer.train(texts, 600, "unigram"), Tokenizer.train(texts, 600, "unigram")
    assert first.fingerprint == second.fingerprint
    assert (first.pad_id, first.eos_id) == (PAD_ID, EOS_ID)
    plain = [t for t in texts if unicodedata.normalize("NFKC", t) == t]
    assert first.decode_batch(first.encode_batch(plain)) == plain
    with pytest.raises(UserError, match="tokenizer_model"):
        Tokenizer.train(texts, 600, "sentencepiece")


def test_tokenizer_save_load_and_auto_tokenizer(small_tokenizer, tmp_path):
    small_tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == small_tokenizer.fingerprint
    assert (loaded.pad_id, loaded.eos_id, loaded.vocab_size) == (0, 1, small_tokenizer.vocab_size)
    sentence = "Two young men are playing soccer in a park."
    expected = small_tokenizer.encode_batch([sentence])[0]
    assert loaded.encode_batch([sentence])[0] == expected
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(sentence, add_special_tokens=False)["input_ids"] == expected
    assert (auto.pad_token_id, auto.eos_token_id, auto.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)


def test_trained_tokenizers_are_cached_by_texts_settings_and_code(sample_train, tmp_path, monkeypatch):
    from crosswrite_jax.data import tokenizer as tokenizer_lib

    monkeypatch.setenv(tokenizer_lib.CACHE_ENV, str(tmp_path / "cache"))
    trained = []
    real_train = Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda cls, *a, **k: trained.append(a[1:]) or
                                                        real_train(cls, *a, **k)))
    texts = [s for s, _ in sample_train[:300]]
    first, folder = tokenizer_lib.train_cached(texts, 300, "bpe")
    again, same_folder = tokenizer_lib.train_cached(texts, 300, "bpe")
    assert len(trained) == 1 and same_folder == folder and again.fingerprint == first.fingerprint
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in folder.iterdir()}
    tokenizer_lib.train_cached(texts, 320, "bpe")  # other settings, other texts: trained again
    tokenizer_lib.train_cached(texts[:-1], 300, "bpe")
    assert len(trained) == 3
    (folder / "tokenizer.json").write_text("{")  # a damaged entry is trained again and replaced
    mended, _ = tokenizer_lib.train_cached(texts, 300, "bpe")
    assert len(trained) == 4 and mended.fingerprint == first.fingerprint
    assert Tokenizer.load(folder).fingerprint == first.fingerprint
    monkeypatch.setenv(tokenizer_lib.CACHE_ENV, "")  # off
    assert tokenizer_lib.train_cached(texts, 300, "bpe")[1] is None and len(trained) == 5


def test_a_fresh_run_copies_the_cached_tokenizer_its_data_trained_before(tmp_path, monkeypatch):
    from conftest import tiny_config

    from crosswrite_jax import workdir

    monkeypatch.setenv("CROSSWRITE_TOKENIZER_CACHE", str(tmp_path / "cache"))
    trained = []
    real_train = Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda cls, *a, **k: trained.append(1) or
                                                        real_train(cls, *a, **k)))
    first = workdir.prepare(tiny_config(), tmp_path / "one")
    second = workdir.prepare(tiny_config(), tmp_path / "two")
    assert trained == [1] and second.tokenizer.fingerprint == first.tokenizer.fingerprint
    files = lambda run: {f.name: f.read_bytes() for f in (run / "tokenizer").iterdir()}  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one") and "tokenizer_config.json" in files(tmp_path / "one")


def test_tokenizer_load_errors_and_foreign_specials(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "<eos>": 3}
    HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))
    with pytest.raises(UserError, match="eos"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "[PAD]", "eos_token": {"content": "<eos>"}, "unk_token": "[UNK]"}))
    foreign = Tokenizer.load(tmp_path)
    assert (foreign.pad_id, foreign.eos_id, foreign.unk_id) == (0, 3, 1)


# ---------------------------------------------------------------- training pipeline

def _assert_rows_well_formed(array, eos_id=EOS_ID):
    for row in array:
        length = int((row != PAD_ID).sum())
        assert length > 0 and row[length - 1] == eos_id
        assert (row[length:] == PAD_ID).all() and (row[:length] != PAD_ID).all()
        assert eos_id not in row[:length - 1]


def test_train_dataset_seeded_and_random_access(sample_train, sample_tokenizer):
    a, b = _train(sample_train, sample_tokenizer), _train(sample_train, sample_tokenizer)
    for k in (0, 1, 250, 1000, 7):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(a[k][key], b[k][key])
    other = _train(sample_train, sample_tokenizer, seed=1)
    assert any(not np.array_equal(a[k]["targets"], other[k]["targets"]) for k in range(3))


def test_train_batches_shapes_and_rows(sample_train, sample_tokenizer):
    ds = _train(sample_train, sample_tokenizer)
    for k in range(20):
        batch = ds[k]
        assert set(batch) == {"inputs", "targets"}
        for key in ("inputs", "targets"):
            array = batch[key]
            assert array.dtype == np.int32 and array.shape[0] == 32 and array.shape[1] in BUCKETS
            longest = int((array != PAD_ID).sum(axis=1).max())
            assert array.shape[1] == min(b for b in BUCKETS if b >= longest)
            _assert_rows_well_formed(array)


def test_train_truncation_caps_at_max_length_and_largest_bucket(sample_train, sample_tokenizer):
    ds = _train(sample_train, sample_tokenizer, max_source_length=8, max_target_length=64,
                bucket_lengths=(4, 8, 12))
    for k in range(10):
        batch = ds[k]
        assert batch["inputs"].shape[1] == 8 and batch["targets"].shape[1] == 12
        _assert_rows_well_formed(batch["inputs"])
        _assert_rows_well_formed(batch["targets"])


def test_train_process_shards_concatenate_to_global_batch(sample_train, sample_tokenizer):
    whole = _train(sample_train, sample_tokenizer)
    shards = [_train(sample_train, sample_tokenizer, process_index=i, process_count=2) for i in range(2)]
    for k in (0, 3, 300):
        for key in ("inputs", "targets"):
            parts = [shard[k][key] for shard in shards]
            assert parts[0].shape == parts[1].shape == (16, whole[k][key].shape[1])
            np.testing.assert_array_equal(np.concatenate(parts), whole[k][key])
    with pytest.raises(UserError, match="batch_size"):
        _train(sample_train, sample_tokenizer, global_batch_size=33, process_count=2)


@pytest.mark.parametrize("window", [1, 4])
def test_train_epoch_covers_every_example_once(window):
    pairs = [(f"x {i}", "y " * (1 + i % 5) + "z") for i in range(96)] + [("", "y"), ("x", "")]
    tok = Tokenizer.train([s for pair in pairs for s in pair], vocab_size=60)
    ds = _train(pairs, tok, global_batch_size=8, length_grouping_window=window, bucket_lengths=(4, 8, 16))
    epochs = []
    for epoch in range(2):
        seen = []
        for k in range(epoch * 12, epoch * 12 + 12):
            seen.extend(tok.decode_batch(ds[k]["inputs"]))
        assert sorted(seen) == sorted(f"x {i}" for i in range(96))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # each epoch is reshuffled


def test_length_grouping_reduces_padding(sample_train, sample_tokenizer):
    grouped = padding_fraction(_train(sample_train, sample_tokenizer, length_grouping_window=16), 60)
    plain = padding_fraction(_train(sample_train, sample_tokenizer, length_grouping_window=1), 60)
    assert set(grouped) == {"inputs", "targets"}
    total = lambda f: f["inputs"] + f["targets"]  # noqa: E731
    assert total(grouped) < total(plain)
    assert 0.0 <= grouped["inputs"] < 1.0


# ---------------------------------------------------------------- eval pipeline

def test_eval_batches_cover_in_order(small_tokenizer):
    pairs = read_parallel("multi30k_sample", "val", "en", "de", max_examples=70)
    batches = eval_batches(pairs, small_tokenizer, batch_size=16, max_source_length=64, bucket_lengths=BUCKETS)
    assert len(batches) == 5
    index = np.concatenate([b["example_index"] for b in batches])
    assert index.tolist() == list(range(70)) + [-1] * 10
    decoded = []
    for batch in batches:
        assert batch["inputs"].dtype == np.int32 and batch["example_index"].dtype == np.int32
        assert batch["inputs"].shape[0] == 16 and batch["inputs"].shape[1] in BUCKETS
        real = batch["example_index"] >= 0
        assert (batch["inputs"][~real] == PAD_ID).all()
        _assert_rows_well_formed(batch["inputs"][real])
        decoded.extend(small_tokenizer.decode_batch(batch["inputs"][real]))
    sources = [s for s, _ in pairs]
    plain = [i for i, s in enumerate(sources) if unicodedata.normalize("NFKC", s) == s]
    assert [decoded[i] for i in plain] == [sources[i] for i in plain]
    with_targets = eval_batches(pairs, small_tokenizer, batch_size=16, max_source_length=64,
                                bucket_lengths=BUCKETS, max_target_length=64)
    assert with_targets[0]["targets"].shape[0] == 16


# ---------------------------------------------------------------- packing

def _unpack(batch, side):
    """The examples of a packed batch as tuples of ids, by (row, segment)."""
    out = []
    ids, segments, positions = batch[side], batch[f"{side}_segments"], batch[f"{side}_positions"]
    for r in range(ids.shape[0]):
        for s in range(1, segments[r].max() + 1):
            where = segments[r] == s
            assert (positions[r][where] == np.arange(where.sum())).all()  # positions restart per example
            assert where.nonzero()[0].tolist() == list(range(where.nonzero()[0][0], where.nonzero()[0][-1] + 1))
            out.append(tuple(ids[r][where]))
        assert (ids[r][segments[r] == 0] == PAD_ID).all()
    return out


def test_packing_keeps_every_pair_once_per_epoch_and_cuts_padding(sample_train, sample_tokenizer):
    pairs = sample_train[:600]
    ds = packed_train_dataset(pairs, sample_tokenizer, global_batch_size=8, source_length=48, target_length=48,
                              seed=3)
    seen, k = [], 0
    while len(seen) < 560:  # most of an epoch (the last partial batch of rows is dropped)
        batch = ds[k]
        assert batch["inputs"].shape == (8, 48) and batch["targets"].shape == (8, 48)
        sources, targets = _unpack(batch, "inputs"), _unpack(batch, "targets")
        assert len(sources) == len(targets)
        seen.extend(zip(sources, targets))
        k += 1
    expected = {(tuple(sample_tokenizer.encode_batch([s])[0] + [EOS_ID]),
                 tuple(sample_tokenizer.encode_batch([t])[0] + [EOS_ID])) for s, t in pairs}
    assert len(set(seen)) == len(seen) and set(seen) <= expected
    assert padding_fraction(ds, 10)["targets"] < 0.5 * padding_fraction(
        _train(pairs, sample_tokenizer, global_batch_size=32, length_grouping_window=1), 10)["targets"]
    again = packed_train_dataset(pairs, sample_tokenizer, global_batch_size=8, source_length=48, target_length=48,
                                 seed=3)
    assert all((again[5][key] == ds[5][key]).all() for key in ds[5])


def test_packed_process_shards_concatenate_to_the_global_batch(sample_train, small_tokenizer):
    kwargs = dict(global_batch_size=8, source_length=32, target_length=32, seed=1)
    whole = packed_train_dataset(sample_train[:300], small_tokenizer, **kwargs)[4]
    parts = [packed_train_dataset(sample_train[:300], small_tokenizer, process_index=i, process_count=2,
                                  **kwargs)[4] for i in range(2)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
