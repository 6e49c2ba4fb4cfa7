"""Document sources (crosswrite_jax/data/text_sources.py): every format, path resolution, bad input, TFDS offline."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import socket
import sys

import pytest

from crosswrite_jax.data import text_sources
from crosswrite_jax.data.text_sources import (
    SourceSpec,
    parse_source,
    read_conll,
    read_delimited,
    read_documents,
    read_jsonl,
)
from crosswrite_jax.errors import UserError


def write(path, text: str | bytes, gz: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ----------------------------------------------------------------------------------------------------- parse_source


def test_parse_source_defaults_and_options():
    assert parse_source("text:a/*.txt") == SourceSpec("text", "a/*.txt", {"document": "line", "encoding": "utf-8",
                                                                         "part": ""})
    spec = parse_source("csv:x.csv?column=text&header=true")
    assert (spec.format, spec.pattern, spec.options["column"], spec.options["header"]) == ("csv", "x.csv", "text",
                                                                                           "true")
    assert parse_source("jsonl:x.jsonl?field=a.b").options["field"] == "a.b"
    tfds_spec = parse_source("tfds:wiki40b/en:1.3.0?split=train[:10%]&field=text&data_dir=gs://b/tfds")
    assert tfds_spec.pattern == "wiki40b/en:1.3.0"
    assert tfds_spec.options == {"split": "train[:10%]", "field": "text", "data_dir": "gs://b/tfds"}
    # A '?' not followed by key=value options is a glob wildcard.
    assert parse_source("text:part-?.txt").pattern == "part-?.txt"
    assert parse_source("text:part-?.txt?document=file").pattern == "part-?.txt"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.format = "tsv"


# ----------------------------------------------------------------------------------------------------- formats


def test_text_line_paragraph_file_gz_crlf(tmp_path):
    write(tmp_path / "a.txt", "first line\r\n\r\n  second line  \r\nthird\r\n")
    write(tmp_path / "b.txt.gz", "para one\nstill one\n\n\npara two\n", gz=True)
    assert read_documents("text:a.txt", str(tmp_path)) == ["first line", "second line", "third"]
    assert read_documents("text:*", str(tmp_path)) == ["first line", "second line", "third", "para one",
                                                       "still one", "para two"]
    assert read_documents("text:*?document=paragraph", str(tmp_path)) == [
        "first line", "second line third", "para one still one", "para two"]
    assert read_documents("text:*?document=file", str(tmp_path)) == [
        "first line\n\n  second line  \nthird", "para one\nstill one\n\n\npara two"]


def test_parts_of_one_permutation_are_disjoint_and_count_lines_before_empty_ones_drop(tmp_path):
    from crosswrite_jax.data.subsets import permuted_positions

    lines = [f"line {i}" if i % 7 else "" for i in range(60)]  # lines 0, 7, 14, ... are empty
    write(tmp_path / "a.txt", "\n".join(lines) + "\n")
    first = read_documents("text:a.txt?part=5:0:20", str(tmp_path))
    rest = read_documents("text:a.txt?part=5:20:60", str(tmp_path))
    assert not set(first) & set(rest)
    assert sorted(first + rest) == sorted(line for line in lines if line)
    # positions count file lines, empty ones included: part N of a source is part N of a line-aligned pair file
    assert first == [lines[i] for i in permuted_positions(60, 5, 0, 20) if lines[i]]
    assert read_documents("text:a.txt?part=6:0:20", str(tmp_path)) != first


@pytest.mark.parametrize("part, message", [("1:5", "SEED:START:STOP"), ("0:9:3", "START < STOP"),
                                           ("0:a:3", "SEED:START:STOP"), ("0:10:61", "lower STOP to at most 60")])
def test_a_bad_part_names_the_spec_and_the_fix(tmp_path, part, message):
    write(tmp_path / "a.txt", "\n".join(f"line {i}" for i in range(60)) + "\n")
    with pytest.raises(UserError, match=message) as error:
        read_documents(f"text:a.txt?part={part}", str(tmp_path))
    assert f"part={part}" in str(error.value)


def test_text_bom_and_encoding_fallback(tmp_path):
    write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello\n")
    write(tmp_path / "latin.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    assert read_documents("text:bom.txt", str(tmp_path)) == ["hello"]
    assert read_documents("text:*.txt?encoding=utf-8,latin-1", str(tmp_path)) == ["hello", "caf\u00e9 cr\u00e8me"]


def test_tsv_index_and_header(tmp_path):
    write(tmp_path / "train.tsv", 'a "quoted, text\t1\r\nsecond\t0')  # no final newline, quotes kept as is
    assert read_documents("tsv:train.tsv?column=0", str(tmp_path)) == ['a "quoted, text', "second"]
    assert read_documents("tsv:train.tsv?column=1", str(tmp_path)) == ["1", "0"]
    write(tmp_path / "h.tsv.gz", "label\tsentence\n1\tgood film\n\n0\tbad film\n", gz=True)
    assert read_documents("tsv:h.tsv.gz?column=sentence&header=true", str(tmp_path)) == ["good film", "bad film"]
    assert read_documents("tsv:h.tsv.gz?column=1&header=true", str(tmp_path)) == ["good film", "bad film"]
    assert read_delimited(tmp_path / "train.tsv", "\t", expected_columns=2) == [
        (1, ['a "quoted, text', "1"]), (2, ["second", "0"])]


def test_csv_quoting_multiline_and_header(tmp_path):
    write(tmp_path / "x.csv", 'id,text\r\n1,"hello, world"\r\n2,"two\nlines"\r\n\r\n3,plain\r\n')
    assert read_documents("csv:x.csv?column=text&header=true", str(tmp_path)) == ["hello, world", "two\nlines",
                                                                                  "plain"]
    rows = read_delimited(tmp_path / "x.csv", ",")
    assert [number for number, _ in rows] == [1, 2, 3, 6]  # a multi-line row reports its first line
    assert rows[2][1] == ["2", "two\nlines"]


def test_jsonl_dotted_list_and_index(tmp_path):
    lines = [{"source": ["Sentence one.", "Sentence two."], "meta": {"title": "T1"}, "target": ["s1", "s2"]},
             {"source": ["Only one."], "meta": {"title": "T2"}, "target": ["s3"]},
             {"source": [], "meta": {"title": ""}, "target": ["s4"]}]
    write(tmp_path / "d" / "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_documents("jsonl:d/*.jsonl?field=source", str(tmp_path)) == ["Sentence one. Sentence two.",
                                                                           "Only one."]
    assert read_documents("jsonl:d/train.jsonl?field=meta.title", str(tmp_path)) == ["T1", "T2"]
    assert read_documents("jsonl:d/train.jsonl?field=target.0", str(tmp_path)) == ["s1", "s3", "s4"]
    assert [n for n, _ in read_jsonl(tmp_path / "d" / "train.jsonl")] == [1, 2, 3]


def test_conll_columns_docstart_and_sentences(tmp_path):
    write(tmp_path / "ner.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\n"
                                  "Peter NNP B-PER\r\nBlackburn NNP I-PER\r\n")
    assert read_documents("conll:ner.conll", str(tmp_path)) == ["EU rejects", "Peter Blackburn"]
    assert read_documents("conll:ner.conll?column=2", str(tmp_path)) == ["B-ORG O", "B-PER I-PER"]
    write(tmp_path / "tabs.conll", "@user\tO\nNew\tB-loc\nYork\tI-loc\n")
    sentences = read_conll(tmp_path / "tabs.conll", min_columns=2)
    assert sentences == [[(1, ["@user", "O"]), (2, ["New", "B-loc"]), (3, ["York", "I-loc"])]]
    assert [[n for n, _ in s] for s in read_conll(tmp_path / "ner.conll", 3)] == [[3, 4], [7, 8]]


# ----------------------------------------------------------------------------------------------------- resolution


def test_data_dir_env_and_cwd_resolution(tmp_path, monkeypatch):
    write(tmp_path / "arg" / "c.txt", "from arg\n")
    write(tmp_path / "env" / "c.txt", "from env\n")
    write(tmp_path / "cwd" / "c.txt", "from cwd\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("CROSSWRITE_DATA", raising=False)
    assert read_documents("text:c.txt") == ["from cwd"]
    monkeypatch.setenv("CROSSWRITE_DATA", str(tmp_path / "env"))
    assert read_documents("text:c.txt") == ["from env"]
    assert read_documents("text:c.txt", data_dir=str(tmp_path / "arg")) == ["from arg"]
    assert read_documents(f"text:{tmp_path / 'arg' / 'c.txt'}") == ["from arg"]  # absolute ignores data_dir


def test_glob_order_is_sorted_and_skips_directories(tmp_path):
    for name in ["b10.txt", "a.txt", "b2.txt", "sub/z.txt"]:
        write(tmp_path / name, name + "\n")
    (tmp_path / "dir.txt").mkdir()
    assert read_documents("text:*.txt", str(tmp_path)) == ["a.txt", "b10.txt", "b2.txt"]
    assert read_documents("text:**/*.txt", str(tmp_path)) == ["a.txt", "b10.txt", "b2.txt", "sub/z.txt"]


def test_documents_sentence_pairs_and_tokenizer_input_read_lines_alike(tmp_path, monkeypatch):
    from crosswrite_jax.data import tokenizer
    from crosswrite_jax.data.sources import read_parallel

    data = "\ufefffirst\r\nsecond\rthird\n".encode("utf-8")  # a BOM, CRLF, a lone CR
    write(tmp_path / "train.en", data)
    write(tmp_path / "train.de.gz", data, gz=True)
    lines = ["first", "second", "third"]
    assert read_documents("text:train.en", str(tmp_path)) == lines
    assert read_parallel(str(tmp_path), "train", "en", "de") == list(zip(lines, lines))
    monkeypatch.setenv("CROSSWRITE_DATA", str(tmp_path / "elsewhere"))  # tokenizer input is relative to the cwd
    monkeypatch.chdir(tmp_path)
    assert tokenizer.read_lines(["train.*"]) == lines * 2  # train.de.gz, then train.en
    assert tokenizer.read_lines(["train.en", "./train.en"], max_lines=2) == lines[:2]  # one file, read once
    write(tmp_path / "bad.txt", b"ok\ncaf\xe9\n")
    for call in (lambda: tokenizer.read_lines(["bad.txt"]), lambda: read_documents("text:bad.txt", str(tmp_path))):
        with pytest.raises(UserError, match=r"bad.txt:2: not UTF-8 text \(byte 0xe9 at column 4"):
            call()


# ----------------------------------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    # (id, files {name: bytes}, call(tmp_path), substrings the message must contain)
    ("missing file", {}, lambda d: read_documents("text:nope.txt", d), ["nope.txt", "not found", "data_dir"]),
    ("glob matches nothing", {}, lambda d: read_documents("text:corpus/*.txt", d),
     ["corpus/*.txt", "matches no file", "{dir}"]),
    ("directory instead of file", {"sub/x.txt": b"x\n"}, lambda d: read_documents("text:sub", d),
     ["sub", "is a directory"]),
    ("directory to a reader", {"sub/x.txt": b"x\n"}, lambda d: read_jsonl(os.path.join(d, "sub")),
     ["sub", "is a directory"]),
    ("empty file", {"e.txt": b""}, lambda d: read_documents("text:e.txt", d), ["e.txt", "is empty"]),
    ("only blank lines", {"b.txt": b"\n  \n"}, lambda d: read_documents("text:b.txt", d),
     ["text:b.txt", "{dir}/b.txt", "no documents"]),
    ("non-utf8", {"l.txt": b"ok\nstill ok\ncaf\xe9\n"}, lambda d: read_documents("text:l.txt", d),
     ["l.txt:3:", "not UTF-8", "0xe9", "encoding=utf-8,latin-1"]),
    ("bad gzip", {"g.txt.gz": b"not gzip"}, lambda d: read_documents("text:g.txt.gz", d),
     ["g.txt.gz", "not a valid gzip"]),
    ("tsv short line", {"x.tsv": b"a\t1\nb\t0\nc\t1\nno label\n"}, lambda d: read_documents("tsv:x.tsv", d),
     ["x.tsv:4:", "1 column, expected 2"]),
    ("tsv expected columns", {"y.tsv": b"a\t1\t2\n"}, lambda d: read_delimited(os.path.join(d, "y.tsv"), "\t", 2),
     ["y.tsv:1:", "3 columns, expected 2"]),
    ("tsv column out of range", {"z.tsv": b"a\t1\n"}, lambda d: read_documents("tsv:z.tsv?column=2", d),
     ["z.tsv:1:", "column=2"]),
    ("csv column name missing", {"c.csv": b"id,body\n1,hi\n"},
     lambda d: read_documents("csv:c.csv?column=text&header=true", d), ["c.csv:1:", "no column 'text'", "id, body"]),
    ("csv bad quoting", {"q.csv": b'a,b\n1,"x"y\n'}, lambda d: read_documents("csv:q.csv", d),
     ["q.csv:2:", "not valid CSV"]),
    ("bad json line", {"j.jsonl": b'{"text": "a"}\n\n{"text": "b",}\n'},
     lambda d: read_documents("jsonl:j.jsonl?field=text", d), ["j.jsonl:3:", "not valid JSON"]),
    ("missing json field", {"k.jsonl": b'{"text": "a"}\n{"body": "b"}\n'},
     lambda d: read_documents("jsonl:k.jsonl?field=text", d), ["k.jsonl:2:", "no field 'text'", "body"]),
    ("json field not text", {"n.jsonl": b'{"text": 3}\n'}, lambda d: read_documents("jsonl:n.jsonl?field=text", d),
     ["n.jsonl:1:", "not a string"]),
    ("conll short line", {"s.conll": b"EU\tB-ORG\nrejects\n"}, lambda d: read_documents("conll:s.conll?column=1", d),
     ["s.conll:2:", "1 column, expected at least 2"]),
    ("unknown format", {}, lambda d: read_documents("parquet:x.parquet", d),
     ["parquet:x.parquet", "unknown format 'parquet'", "text, tsv, csv, jsonl, conll, tfds"]),
    ("no format prefix", {}, lambda d: parse_source("corpus.txt"), ["corpus.txt", "no format prefix"]),
    ("unknown option", {}, lambda d: parse_source("tsv:x.tsv?colum=1"),
     ["tsv:x.tsv?colum=1", "unknown option 'colum'", "column, header"]),
    ("missing required option", {}, lambda d: parse_source("jsonl:x.jsonl"),
     ["jsonl:x.jsonl", "needs option 'field'"]),
    ("tfds missing split", {}, lambda d: parse_source("tfds:mnist?field=image"), ["needs option 'split'"]),
    ("bad option value", {}, lambda d: parse_source("text:x?document=page"), ["document='page'", "paragraph"]),
    ("column name without header", {}, lambda d: parse_source("tsv:x.tsv?column=text"),
     ["column='text'", "header=true"]),
    ("unknown encoding", {}, lambda d: parse_source("text:x?encoding=klingon"), ["klingon", "not a known codec"]),
]


@pytest.mark.parametrize("files, call, expected", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_a_user_error(tmp_path, monkeypatch, files, call, expected):
    monkeypatch.delenv("CROSSWRITE_DATA", raising=False)
    for name, data in files.items():
        write(tmp_path / name, data)
    with pytest.raises(UserError) as info:
        call(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part.replace("{dir}", str(tmp_path)) in message, message


# ----------------------------------------------------------------------------------------------------- tfds


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails, and fails the test even if the caller swallows the error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"network access attempted in an offline test: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


def build_tiny_tfds(data_dir, text_files):
    """Builds a 2-split ArrayRecord TFDS dataset from local text files, offline and without TensorFlow."""
    import numpy as np
    import tensorflow_datasets as tfds

    class CrosswriteTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="lines")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "meta": {"file": tfds.features.Text()}, "label": tfds.features.Scalar(
                    dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(text_files), "validation": self._generate_examples(text_files[:1])}

        def _generate_examples(self, paths):
            for path in paths:
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                    yield f"{path.name}:{number}", {"text": line, "meta": {"file": path.name}, "label": number}

    builder = CrosswriteTinyText(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_tfds_build_offline_and_read_back(tmp_path, monkeypatch, no_network):
    files = [write(tmp_path / "a.txt", "hello world\nsecond doc\n"), write(tmp_path / "b.txt", "caf\u00e9 trois\n")]
    build_tiny_tfds(tmp_path / "tfds", files)
    expected = ["hello world", "second doc", "caf\u00e9 trois"]
    docs = read_documents(f"tfds:crosswrite_tiny_text?split=train&field=text&data_dir={tmp_path / 'tfds'}")
    assert isinstance(docs, text_sources.TfdsDocuments) and not isinstance(docs, list)
    assert sorted(docs) == sorted(expected) and len(docs) == 3  # TFDS shuffles by key hash: compare as sets
    assert docs[-1] == docs[2] and docs[0:2] == [docs[0], docs[1]]
    assert docs.__getitems__([2, 0]) == [docs[2], docs[0]]
    assert list(pickle.loads(pickle.dumps(docs))) == list(docs)  # grain worker processes get a pickled copy
    # name/config:version, a relative data_dir (resolved like local paths), a nested field, a split slice.
    monkeypatch.setenv("CROSSWRITE_DATA", str(tmp_path))
    same = read_documents("tfds:crosswrite_tiny_text/lines:1.0.0?split=train&field=text&data_dir=tfds")
    assert list(same) == list(docs)
    assert set(read_documents("tfds:crosswrite_tiny_text?split=train&field=meta.file&data_dir=tfds")) == {
        "a.txt", "b.txt"}
    assert sorted(read_documents("tfds:crosswrite_tiny_text?split=validation&field=text&data_dir=tfds")) == sorted(
        expected[:2])
    assert len(read_documents("tfds:crosswrite_tiny_text?split=train[:2]&field=text&data_dir=tfds")) == 2
    # Bad input: unknown dataset, unknown split, missing field, a non-text field.
    for spec, part in [("tfds:no_such_dataset?split=train&field=text&data_dir=tfds", "no_such_dataset"),
                       ("tfds:crosswrite_tiny_text?split=test&field=text&data_dir=tfds", "split 'test'"),
                       ("tfds:crosswrite_tiny_text?split=train&field=body&data_dir=tfds", "no field 'body'"),
                       ("tfds:crosswrite_tiny_text?split=train&field=label&data_dir=tfds", "not text")]:
        with pytest.raises(UserError) as info:
            read_documents(spec)
        assert part in str(info.value) and spec in str(info.value) and "\n" not in str(info.value)


def test_tfds_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(UserError, match="pip install tensorflow-datasets"):
        read_documents("tfds:lm1b?split=train&field=text")


def test_conll_line_holding_only_a_byte_order_mark_is_blank(tmp_path):
    """WNUT-17's dev file has such a line between two sentences."""
    path = tmp_path / "dev.conll"
    path.write_text("a\tO\nb\tB-x\n\ufeff\nc\tO\n", encoding="utf-8")
    sentences = read_conll(path, min_columns=2)
    assert [[columns for _, columns in s] for s in sentences] == [[["a", "O"], ["b", "B-x"]], [["c", "O"]]]
