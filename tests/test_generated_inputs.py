"""Generated bad input (Hypothesis): random override keys and values, and every file of a trained run truncated,
emptied, bit-flipped or replaced by random bytes. Each command must end with exit 0, 1 or 2; a failure is one
`crosswrite: ...` line on stderr with no traceback; the files the command only reads stay byte-identical."""

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART, TINY_OVERRIDES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosswrite_jax import cli
from crosswrite_jax import config as config_lib

pytestmark = pytest.mark.slow
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
KEYS = config_lib.all_keys()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny translation run: checkpoints at steps 2 and 4, a best/ checkpoint, metrics, tokenizer."""
    workdir = tmp_path_factory.mktemp("generated") / "run"
    flags = dict(TINY_OVERRIDES, **{"train.steps": 4, "checkpoint.every": 2, "train.eval_every": 2,
                                    "train.eval_batches": 1, "train.best_metric": "loss"})
    argv = ["train", "--config", str(QUICKSTART), "--workdir", str(workdir),
            *[f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in flags.items()]]
    assert cli.main(argv) == 0
    return workdir


def _run(argv: list[str]) -> tuple[int, str]:
    """cli.main's exit code and what it printed to stderr (its own lines; logging goes elsewhere)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, err.getvalue()


def _assert_one_line_failure(code: int, err: str, argv: list[str]) -> None:
    assert code in (0, 1, 2), (code, argv)
    assert "Traceback" not in err, (argv, err)
    if code:
        lines = [line for line in err.splitlines() if line.startswith("crosswrite:")]
        assert len(lines) == 1, (argv, err)


def _digests(folder: Path, under: str = "") -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and str(p.relative_to(folder)).startswith(under)}


VALUES = st.one_of(
    st.text(max_size=12), st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
    st.sampled_from(["", "true", "false", "none", "()", "(1,", "[1,2]", "'a'", "1e999", "-0", "0x10", "a,b,c"]))


@settings(max_examples=150, **SETTINGS)
@given(keys=st.lists(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20)), min_size=1, max_size=3),
       values=st.lists(VALUES, min_size=3, max_size=3))
def test_generated_overrides_are_accepted_or_refused_in_one_line(trained, keys, values):
    before = _digests(trained)
    argv = ["keys", "--config", str(trained / "config.json"),
            *[f"--config.{key}={value}" for key, value in zip(keys, values)]]
    code, err = _run(argv)
    _assert_one_line_failure(code, err, argv)
    assert _digests(trained) == before


DAMAGE = st.sampled_from(["empty", "truncate", "flip", "random"])


def _damage(path: Path, how: str, data: st.DataObject) -> None:
    raw = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        path.write_bytes(raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)))])
    elif how == "flip" and raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        path.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[at + 1:])
    else:
        path.write_bytes(data.draw(st.binary(max_size=256)))


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), how=DAMAGE, command=st.sampled_from(["eval", "predict", "report"]))
def test_every_file_of_a_run_damaged_gives_a_result_or_one_line(trained, tmp_path_factory, data, how, command):
    copy = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(trained, copy)
    files = sorted(p for p in copy.rglob("*") if p.is_file() and "tensorboard" not in p.parts)
    victim = data.draw(st.sampled_from(files))
    _damage(victim, how, data)
    checkpoints = _digests(copy, "checkpoints")
    if command == "eval":
        argv = ["eval", "--workdir", str(copy)]
    elif command == "predict":
        (copy.parent / "in.txt").write_text("A man rides a bike.\nTwo dogs.\n")
        argv = ["predict", "--workdir", str(copy), "--input", str(copy.parent / "in.txt")]
    else:
        argv = ["report", str(copy), "--out", str(copy.parent / "report")]
    code, err = _run(argv)
    _assert_one_line_failure(code, err, [*argv, str(victim.relative_to(copy)), how])
    assert _digests(copy, "checkpoints") == checkpoints  # a reader never moves or rewrites a checkpoint
