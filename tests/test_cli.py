"""The `crosswrite` console script end to end: train, eval from the checkpoint, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, TINY_OVERRIDES

CROSSWRITE = shutil.which("crosswrite") or str(Path(sys.executable).parent / "crosswrite")


def _overrides(extra=None):
    values = dict(TINY_OVERRIDES, **(extra or {}))
    return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values.items()]


def _run(*args, devices=2, cache_home=None):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    if cache_home:  # the CLI's default compilation cache, under cache_home; every program cached
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env.update(XDG_CACHE_HOME=str(cache_home), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([CROSSWRITE, *args], capture_output=True, text=True, env=env, timeout=600)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_train_then_eval_through_the_console_script(tmp_path):
    workdir = tmp_path / "run"
    trained = _run("train", "--config", str(QUICKSTART), "--workdir", str(workdir),
                   *_overrides({"mesh.shape": "2,1,1", "train.steps": 6, "checkpoint.every": 3}),
                   cache_home=tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr
    # The compiled train step went to the default persistent cache (a later run loads it instead of compiling).
    from crosswrite_jax import compile_cache

    folder = tmp_path / "cache" / "crosswrite_jax" / "xla" / compile_cache.host_fingerprint()
    cached = [p.name for p in folder.iterdir()]
    assert any(name.startswith("jit_train_step") for name in cached), cached
    assert "XLA compilation cache:" in trained.stderr
    assert _last_json(trained.stdout)["command"] == "train"
    for name in ("config.json", "metrics.jsonl", "checkpoints", "tokenizer/tokenizer.json", "tensorboard"):
        assert (workdir / name).exists(), name
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert list((workdir / "tensorboard").iterdir())  # event files

    evaluated = _run("eval", "--workdir", str(workdir), "--step", "3", "--split", "test", devices=1)
    assert evaluated.returncode == 0, evaluated.stderr
    scores = _last_json(evaluated.stdout)
    assert scores["step"] == 3 and scores["split"] == "test" and scores["examples"] == 24
    assert 0.0 <= scores["bleu"] <= 100.0
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in evaluated.stdout
    hypotheses = Path(scores["hypotheses_file"]).read_text().splitlines()
    assert len(hypotheses) == 24


@pytest.mark.slow  # console-script subprocesses; tests/test_bad_input.py covers the cases in-process
def test_bad_input_is_one_line_exit_2_and_keeps_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    ok = _run("train", "--config", str(QUICKSTART), "--workdir", str(workdir),
              *_overrides({"train.steps": 2, "checkpoint.every": 2}))
    assert ok.returncode == 0, ok.stderr
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())

    typo = _run("train", "--config", str(QUICKSTART), "--workdir", str(workdir),
                *_overrides({"train.steps": 2}), "--config.optimizer.learnig_rate=1")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1] == (
        "crosswrite: error: unknown config key 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'?")
    assert "Traceback" not in typo.stderr

    other_model = _run("train", "--config", str(QUICKSTART), "--workdir", str(workdir),
                       *_overrides({"train.steps": 4, "model.d_model": 64}))
    assert other_model.returncode == 2
    assert "model.d_model=32" in other_model.stderr and "Traceback" not in other_model.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before

    missing = _run("eval", "--workdir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "has no config.json" in missing.stderr

    no_step = _run("eval", "--workdir", str(workdir), "--step", "99")
    assert no_step.returncode == 2 and "no checkpoint at step 99" in no_step.stderr

    debug = _run("--debug", "eval", "--workdir", str(tmp_path / "nowhere"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_compilation_cache_default_yields_to_jax_env(monkeypatch, tmp_path):
    """JAX_COMPILATION_CACHE_DIR wins (empty: off); otherwise the cache lives under XDG_CACHE_HOME."""
    from crosswrite_jax import compile_cache

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert compile_cache.enable_default() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.enable_default() == str(tmp_path / "mine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compile_cache.default_dir()
    assert folder.parent == tmp_path / "crosswrite_jax" / "xla"
    assert folder.name == compile_cache.host_fingerprint() and len(folder.name) == 12


RUN_WITH_HANDLER = ("import atexit, sys\n"
                    "atexit.register(lambda: print('exit handler ran', flush=True))\n"
                    "from crosswrite_jax import cli\n"
                    "sys.argv = ['crosswrite', *sys.argv[1:]]\n"
                    "cli.run()\n"
                    "print('not reached')\n")


def test_the_command_exits_with_mains_code_after_the_exit_handlers(tmp_path):
    """`crosswrite` is cli.run: main's exit code, atexit handlers run (jax.distributed's shutdown is one), and
    nothing after it (the interpreter's native teardown is skipped)."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert scripts["project"]["scripts"]["crosswrite"] == "crosswrite_jax.cli:run"
    ok = subprocess.run([sys.executable, "-c", RUN_WITH_HANDLER, "keys", "--config", str(QUICKSTART)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "train.steps = 1000" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    bad = subprocess.run([sys.executable, "-c", RUN_WITH_HANDLER, "keys", "--config", str(tmp_path / "none.py")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "none.py" in bad.stderr and "exit handler ran" in bad.stdout
    assert "not reached" not in ok.stdout + bad.stdout
