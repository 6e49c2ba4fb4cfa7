"""`crosswrite sweep`: Optuna studies over a tiny quickstart, local workers on one journal, resume, pruning, and
bad input refused before any trial starts."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import QUICKSTART, ROOT, TINY_OVERRIDES, tiny_config

from crosswrite_jax import sweep as sweep_lib
from crosswrite_jax.cli import main
from crosswrite_jax.errors import UserError

# Every trial: a tiny quickstart that validates (and decodes 8 val pairs) every 3 of its 6 steps.
TRIAL = dict(TINY_OVERRIDES, **{"train.steps": 6, "train.eval_every": 3, "train.eval_batches": 1,
                                "train.eval_decode_examples": 8, "train.best_metric": "chrf", "checkpoint.every": 3,
                                "eval.max_examples": 8})
TRIAL_ARGS = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TRIAL.items()]
SPACE = {"optimizer.learning_rate": "log(1e-4,3e-2)"}


def _sweep(tmp_path, trials: int, pruner: str = "median", **extra) -> sweep_lib.Sweep:
    config = tiny_config(**{k.replace(".", "__"): v for k, v in TRIAL.items()})
    return sweep_lib.Sweep(config=config, workdir=tmp_path / "sweep", space=sweep_lib.parse_space(SPACE, config),
                           metric="chrf", direction="maximize", trials=trials, pruner=pruner, **extra)


# ----------------------------------------------------------------------------------------------- the SPEC parser


@pytest.mark.parametrize("spec, expected", [
    ("log(1e-4,3e-3)", sweep_lib.Dimension("k", "log", 1e-4, 3e-3)),
    (" uniform( 0 , 0.3 ) ", sweep_lib.Dimension("k", "uniform", 0.0, 0.3)),
    ("int(4,32)", sweep_lib.Dimension("k", "int", 4, 32)),
    ("choice(8,16,32)", sweep_lib.Dimension("k", "choice", choices=(8, 16, 32))),
    ("choice(relu,gelu,0.5,true)", sweep_lib.Dimension("k", "choice", choices=("relu", "gelu", 0.5, True))),
])
def test_spec_forms(spec, expected):
    assert sweep_lib.parse_dimension("k", spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("loguniform(1,2)", "is not a SPEC"), ("log(1e-4)", "two bounds"), ("log(0,1)", "LOW > 0"),
    ("uniform(3,1)", "LOW must be below HIGH"), ("int(1.5,4)", "whole-number"), ("choice()", "one or more"),
    ("uniform(a,1)", "'a' is not a number"), ("log(1e-4,3e-3", "is not a SPEC"),
])
def test_bad_specs_name_the_key_and_the_forms(spec, message):
    with pytest.raises(UserError, match=message) as error:
        sweep_lib.parse_dimension("optimizer.learning_rate", spec)
    assert "optimizer.learning_rate" in str(error.value)


def test_a_space_value_the_config_refuses_is_caught_before_any_trial():
    with pytest.raises(UserError, match="reaches 5"):
        sweep_lib.parse_space({"model.num_heads": "choice(4,5)"}, tiny_config())  # d_model 32 / 5 heads


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--space", "optimizer.learnin_rate=log(1e-4,1e-2)"], "not a config key"),
    (["--space", "optimizer.learning_rate=log(1e-4"], "is not a SPEC"),
    (["--space", "optimizer.learning_rate"], "has no '='"),
    (["--space", "optimizer.learning_rate=log(1e-4,1e-2)", "--metric", "f1"], "not reported by task"),
    (["--space", "optimizer.learning_rate=log(1e-4,1e-2)", "--metric", "loss", "--direction", "max"],
     "contradicts metric loss"),
    (["--space", "optimizer.learning_rate=log(1e-4,1e-2)", "--storage", "sqlite:////no/such/folder/s.db"],
     "cannot open it"),
    (["--space", "optimizer.learning_rate=log(1e-4,1e-2)", "--config.train.eval_every=0"], "eval_every is 0"),
    ([], "search space is empty"),  # a recipe with no get_sweep() and no --space
])
def test_bad_input_exits_2_with_one_line_and_starts_no_trial(tmp_path, capsys, args, message):
    workdir = tmp_path / "sweep"
    recipe = QUICKSTART if args else ROOT / "configs" / "mt_multi30k.py"
    code = main(["sweep", "--config", str(recipe), "--workdir", str(workdir), *TRIAL_ARGS, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "trials").exists()


# ----------------------------------------------------------------------------------------------- whole sweeps


def _trials(path):
    import optuna

    from crosswrite_jax.sweep import open_storage

    study = optuna.load_study(study_name="quickstart", storage=open_storage(None, path))
    return study.get_trials(deepcopy=False)


@pytest.mark.slow  # worker processes, each compiling its trials
def test_two_local_workers_share_one_journal_and_a_rerun_adds_only_missing_trials(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    command = ["sweep", "--config", str(QUICKSTART), "--workdir", str(workdir), *TRIAL_ARGS,
               "--space", "optimizer.learning_rate=log(1e-4,3e-2)", "--pruner", "none"]
    assert main(command + ["--trials", "3", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trials = _trials(workdir)
    # a worker whose trial was under way when the third finished completes it too: one over at most
    assert 3 <= summary["complete"] == len(trials) <= 4
    assert {t.user_attrs["worker"] for t in trials} and len({t.user_attrs["worker"] for t in trials}) == 2
    directories = sorted(p.name for p in (workdir / "trials").iterdir())
    assert directories == [f"{t.number:04d}" for t in trials]
    before = {d: (workdir / "trials" / d / "metrics.jsonl").read_bytes() for d in directories}

    assert main(command + ["--trials", str(len(trials) + 1)]) == 0
    capsys.readouterr()
    after = _trials(workdir)
    assert len(after) == len(trials) + 1  # one new trial; finished ones are not rerun
    assert all((workdir / "trials" / d / "metrics.jsonl").read_bytes() == b for d, b in before.items())
    assert "| trial | state | optimizer.learning_rate | chrf |" in (workdir / "sweep.md").read_text()

    assert main(["report", str(workdir), "--out", str(tmp_path / "plots")]) == 0
    capsys.readouterr()
    drawn = sorted(p.name for p in (tmp_path / "plots").iterdir())
    varied = len({t.value for t in _trials(workdir)}) > 1  # fANOVA needs values that differ (a 6-step model's may not)
    assert drawn == ["sweep_quickstart_history.png"] + ["sweep_quickstart_importances.png"] * varied + [
        "sweep_quickstart_slice.png"]

    best = max(after, key=lambda t: t.value)  # the best trial's run directory scores what the study recorded
    assert main(["eval", "--checkpoint", str(workdir / best.user_attrs["directory"] / "best"), "--split", "val"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["chrf"] == pytest.approx(best.value, abs=1e-4)


@pytest.mark.slow  # three trials that train
def test_the_pruner_stops_a_trial_whose_validation_is_worse_than_the_median(tmp_path):
    sweep = _sweep(tmp_path, trials=3)
    study = sweep_lib.load_study(sweep)
    for rate in (3e-2, 3e-2, 1e-4):  # two good trials start the median; a learning rate 300x lower falls behind
        study.enqueue_trial({"optimizer.learning_rate": rate})
    sweep_lib.work(sweep)
    first, second, slow = sorted(_trials(sweep.workdir), key=lambda t: t.number)
    assert first.state.name == second.state.name == "COMPLETE"
    assert slow.state.name == "PRUNED" and slow.user_attrs["steps"] == 3  # stopped at its first validation
    steps = [json.loads(line)["step"] for line in (sweep.workdir / "trials" / "0002" / "metrics.jsonl").open()
             if '"val"' in line]
    assert steps == [3]


@pytest.mark.slow  # a subprocess killed mid-trial, then the sweep run again
def test_a_killed_sweep_resumes_its_running_trial_from_the_checkpoint(tmp_path):
    workdir = tmp_path / "sweep"
    command = [sys.executable, "-m", "crosswrite_jax.cli", "sweep", "--config", str(QUICKSTART), "--workdir",
               str(workdir), *[a.replace("train.steps=6", "train.steps=45") for a in TRIAL_ARGS], "--space",
               "optimizer.learning_rate=log(1e-4,3e-2)", "--trials", "1", "--pruner", "none"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL)
    checkpoints = workdir / "trials" / "0000" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "the trial never saved a checkpoint"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())

    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    dead, retry = sorted(_trials(workdir), key=lambda t: t.number)
    assert dead.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.params == dead.params and retry.user_attrs["directory"] == "trials/0000"
    records = [json.loads(line) for line in (workdir / "trials" / "0000" / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps[-1] == 45  # it went on from its checkpoint: steps up to it were trained (and logged) once
    assert all(steps.count(s) == 1 for s in range(1, killed_at + 1))
    assert sorted(set(steps)) == list(range(1, 46))


def test_the_quickstarts_own_search_space_is_valid_for_it():
    from crosswrite_jax import config as config_lib

    space = config_lib.call_recipe(QUICKSTART, "get_sweep")
    dimensions = sweep_lib.parse_space(space, config_lib.load(QUICKSTART))
    assert {d.kind for d in dimensions.values()} == {"log", "int", "choice"}


@pytest.mark.parametrize("values, importances", [([30.0, 30.0, 30.0], False), ([20.0, 30.0, 25.0], True)])
def test_report_draws_importances_only_when_the_metric_varies(tmp_path, values, importances):
    import optuna

    storage = sweep_lib.open_storage(None, tmp_path / "sweep")
    study = optuna.create_study(study_name="chrf", storage=storage, direction="maximize")
    for i, value in enumerate(values):
        trial = study.ask({"optimizer.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        study.tell(trial, value)
    assert main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "plots")]) == 0
    drawn = sorted(p.name for p in (tmp_path / "plots").iterdir())
    expected = ["sweep_chrf_history.png", "sweep_chrf_slice.png"] + (["sweep_chrf_importances.png"] * importances)
    assert drawn == sorted(expected)


def test_the_baseline_trial_takes_the_recipes_own_values_and_the_summary_states_the_gap(tmp_path, monkeypatch):
    seen = []

    def fake_objective(sweep):  # no training: the value is a function of the learning rate alone
        def value(trial):
            learning_rate = trial.suggest_float("optimizer.learning_rate", 1e-4, 3e-2, log=True)
            seen.append(learning_rate)
            return -abs(learning_rate - 1e-2)
        return value

    monkeypatch.setattr(sweep_lib, "objective", fake_objective)
    sweep = _sweep(tmp_path, trials=4, baseline=True)
    summary = sweep_lib.run_sweep(sweep)
    assert seen[0] == sweep.config.optimizer.learning_rate  # trial 0: the recipe's own value
    assert len(seen) == 4 and len(set(seen)) == 4
    assert summary["baseline_value"] == -abs(seen[0] - 1e-2)
    assert summary["gap"] == pytest.approx(summary["best_value"] - summary["baseline_value"]) and summary["gap"] >= 0
    text = (sweep.workdir / "sweep.md").read_text()
    assert "| 0 (baseline) | complete |" in text and "Against the baseline (trial 0" in text
    sweep_lib.run_sweep(dataclasses.replace(sweep, trials=5))  # a resumed sweep does not queue the baseline again
    assert len(seen) == 5 and seen[4] != seen[0]
