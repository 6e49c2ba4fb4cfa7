"""Hyperparameter search over a recipe with Optuna: a study in storage, trials that are ordinary run directories.

The search space maps config keys to SPEC strings: ``log(1e-4,3e-3)``, ``uniform(0,0.3)``, ``int(4,32)``,
``choice(8,16,32)``. Each trial trains DIR/trials/NNNN with the suggested values over the base config, reports
every validation of the sweep's metric to the pruner, and scores its best validation value. The study lives in a
journal file in DIR (safe for several local processes) or, with a storage URL, in a database that workers on
many machines share. A trial left RUNNING by a dead worker is marked failed and retried with the same values,
resuming from its run directory's checkpoint; finished trials are never rerun.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from crosswrite_jax import config as config_lib
from crosswrite_jax.errors import UserError
from crosswrite_jax.reporting import read_metrics
from crosswrite_jax.tasks import get_task
from crosswrite_jax.tasks.base import HELD_OUT

log = logging.getLogger("crosswrite")

STUDY_FILE = "study.journal"  # the journal storage in the sweep directory
TRIALS = "trials"
SPEC_FORMS = "log(LOW,HIGH), uniform(LOW,HIGH), int(LOW,HIGH) or choice(A,B,...)"
_SPEC = re.compile(r"^\s*(log|uniform|int|choice)\s*\((.*)\)\s*$")
PRUNERS = ("median", "halving", "none")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched config key: a float range (log or uniform), an int range, or a list of choices."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """The value the Optuna trial picks for this key."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: {text.strip()!r} is not a number; write {SPEC_FORMS}") from None


def _choice(text: str) -> Any:
    """A choice's value: an int, a float, true / false, or the text itself."""
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_dimension(key: str, spec: str) -> Dimension:
    """KEY's SPEC string -> a Dimension; a UserError naming the key and the accepted forms otherwise."""
    where = f"search space key '{key}' = {spec!r}"
    match = _SPEC.match(spec)
    if not match:
        raise UserError(f"{where} is not a SPEC; write {SPEC_FORMS}")
    kind, body = match.groups()
    parts = [p for p in body.split(",")]
    if kind == "choice":
        if not body.strip() or any(not p.strip() for p in parts):
            raise UserError(f"{where}: choice() needs one or more comma-separated values, e.g. choice(8,16,32)")
        return Dimension(key, kind, choices=tuple(_choice(p) for p in parts))
    if len(parts) != 2:
        raise UserError(f"{where}: {kind}() takes two bounds, LOW and HIGH, e.g. {kind}(1,10)")
    low, high = (_number(p, where) for p in parts)
    if not low < high:
        raise UserError(f"{where}: LOW must be below HIGH")
    if kind == "log" and low <= 0:
        raise UserError(f"{where}: log() needs LOW > 0; use uniform() for ranges that include 0")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise UserError(f"{where}: int() takes whole-number bounds")
    return Dimension(key, kind, low, high)


def parse_space(space: dict[str, str], config: config_lib.Config) -> dict[str, Dimension]:
    """The search space over `config`'s keys; every value each dimension can take must make a valid config."""
    if not space:
        raise UserError("the search space is empty: give --space KEY=SPEC (e.g. --space "
                        "optimizer.learning_rate='log(1e-4,3e-3)') or define get_sweep() in the recipe")
    known = set(config_lib.all_keys(config))
    dimensions = {}
    for key, spec in space.items():
        if key not in known:
            close = [k for k in sorted(known) if k.split(".")[-1] == key.split(".")[-1]]
            hint = f"; did you mean {close[0]}?" if close else "; `crosswrite keys --config RECIPE` lists them"
            raise UserError(f"search space key '{key}' is not a config key{hint}")
        dimension = parse_dimension(key, spec)
        for value in dimension.choices or (_typed(config, key, dimension.low), _typed(config, key, dimension.high)):
            try:
                config_lib.override(config, {key: value})
            except UserError as error:
                raise UserError(f"search space key '{key}' = {spec!r} reaches {value!r}, which the config refuses: "
                                f"{error}") from None
        dimensions[key] = dimension
    return dimensions


def _typed(config: config_lib.Config, key: str, value: Any) -> Any:
    """A bound as the key's own type (an int key's float bound as an int)."""
    return int(value) if isinstance(config_lib.get(config, key), int) and value == int(value) else value


def resolve_metric(config: config_lib.Config, metric: str | None, direction: str | None) -> tuple[str, str]:
    """The metric the sweep optimizes (default train.best_metric) and its direction, checked against the task."""
    task = get_task(config.task)
    metric = metric or config.train.best_metric
    if not metric:
        raise UserError(f"no metric to optimize: pass --metric (one of {', '.join(task.metrics)}) or set "
                        f"train.best_metric in the recipe")
    if metric not in task.metrics:
        raise UserError(f"--metric {metric!r} is not reported by task '{task.name}'; choose one of "
                        f"{', '.join(task.metrics)}")
    if config.train.eval_every <= 0:
        raise UserError("a sweep scores trials on validation, but train.eval_every is 0; set "
                        "--config.train.eval_every to a positive step count")
    if metric not in HELD_OUT and task.generates and config.train.eval_decode_examples <= 0:
        raise UserError(f"--metric {metric} is scored on decoded text, but train.eval_decode_examples is 0; set "
                        f"--config.train.eval_decode_examples (e.g. 200)")
    natural = "minimize" if task.metric_direction(metric) == "min" else "maximize"
    if direction is not None:
        direction = {"max": "maximize", "min": "minimize"}.get(direction, direction)
        if direction not in ("maximize", "minimize"):
            raise UserError(f"--direction {direction!r}: use max or min")
        if direction != natural:
            raise UserError(f"--direction {direction[:3]} contradicts metric {metric}, which is better "
                            f"{'lower' if natural == 'minimize' else 'higher'}; drop --direction or pass "
                            f"--direction {natural[:3]}")
    return metric, natural


def open_storage(url: str | None, workdir: Path):
    """Optuna storage: the journal file DIR/study.journal, or the database at `url` (workers on many machines)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not url:
        workdir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(workdir / STUDY_FILE)))
    try:
        with warnings.catch_warnings():  # heartbeats and their retry callback are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                              heartbeat_stale_trial_callback=retry)
    except Exception as error:  # sqlalchemy's errors: a bad URL, a missing driver, an unreachable server
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"--storage {url}: cannot open it ({reason}); pass a reachable database URL such as "
                        f"postgresql://USER:PASSWORD@HOST/DB, or leave --storage out for a journal file in the "
                        f"sweep directory") from None


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What every worker of one sweep shares."""

    config: config_lib.Config
    workdir: Path
    space: dict[str, Dimension]
    metric: str
    direction: str
    trials: int
    storage_url: str | None = None
    seed: int = 0
    pruner: str = "median"
    timeout: float | None = None
    study_name: str = ""
    recipe: str = "RECIPE"  # for the best trial's command line
    overrides: tuple[str, ...] = ()  # the sweep's own --config.KEY=VALUE arguments, repeated in that command
    baseline: bool = False  # the first trial takes the base config's own values of the searched keys

    @property
    def name(self) -> str:
        return self.study_name or self.config.name


def make_pruner(name: str):
    """Optuna's median rule (after 2 finished trials and the first validation) or successive halving."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner {name!r}: use one of {', '.join(PRUNERS)}")


def load_study(sweep: Sweep):
    """The sweep's study, created on first use; the same study (and its trials) on every rerun."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=sweep.name, storage=open_storage(sweep.storage_url, sweep.workdir),
                               sampler=optuna.samplers.TPESampler(seed=sweep.seed), pruner=make_pruner(sweep.pruner),
                               direction=sweep.direction, load_if_exists=True)


def trial_directory(sweep: Sweep, trial) -> Path:
    """DIR/trials/NNNN; a retry of a failed trial reuses (and resumes) the directory of the trial it retries."""
    frozen = trial.study._storage.get_trial(trial._trial_id)
    retried = frozen.system_attrs.get("failed_trial")  # Optuna's heartbeat retry (database storage)
    number = trial.user_attrs.get("retry_of", trial.number if retried is None else retried)
    return sweep.workdir / TRIALS / f"{number:04d}"


def best_value(directory: Path, metric: str, direction: str) -> float | None:
    """The best validation value of `metric` a run directory recorded (None before its first validation)."""
    values = [r[metric] for r in read_metrics(directory) if r.get("split") == "val"
              and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


def objective(sweep: Sweep):
    """The function Optuna calls per trial: train the trial's run directory, report validations, score it."""
    import optuna

    from crosswrite_jax.train import train

    def run(trial) -> float:
        values = {key: _typed(sweep.config, key, d.suggest(trial)) for key, d in sweep.space.items()}
        directory = trial_directory(sweep, trial)
        trial.set_user_attr("directory", str(directory.relative_to(sweep.workdir)))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        config = config_lib.override(sweep.config, values)

        def on_validation(step: int, val: dict[str, Any]) -> bool:
            if isinstance(val.get(sweep.metric), (int, float)) and math.isfinite(val[sweep.metric]):
                trial.report(val[sweep.metric], step)
            return trial.should_prune()

        started = time.perf_counter()
        result = train(config, directory, on_validation=on_validation)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("steps", int(result.get("pruned_at") or result.get("stopped_early_at")
                                         or config.train.steps))
        if result.get("pruned_at"):
            raise optuna.TrialPruned(f"pruned at step {result['pruned_at']}")
        score = best_value(directory, sweep.metric, sweep.direction)
        if score is None:
            raise UserError(f"{directory}: the trial recorded no validation {sweep.metric}")
        return score

    return run


def fail_dead_local_trials(study) -> list[int]:
    """Marks RUNNING trials whose worker process on this machine is gone as failed, and queues a retry of each
    with the same values (it resumes the dead trial's directory). Returns the numbers of the failed trials."""
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            failed.append(trial.number)
            origin = trial.user_attrs.get("retry_of", trial.number)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": origin})
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(study) -> int:
    """Trials that count towards --trials: complete or pruned."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def work(sweep: Sweep) -> None:
    """One worker: runs trials until the study holds sweep.trials finished ones (or the timeout passes)."""
    import optuna

    study = load_study(sweep)
    failed = fail_dead_local_trials(study)
    if failed:
        log.warning("trials %s were left running by a stopped worker: marked failed and queued again",
                    ", ".join(map(str, failed)))
    remaining = sweep.trials - finished(study)
    if remaining <= 0:
        return
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    study.optimize(objective(sweep), n_trials=remaining + len(failed), timeout=sweep.timeout,
                   callbacks=[optuna.study.MaxTrialsCallback(sweep.trials, states=counted)],
                   catch=(UserError,), gc_after_trial=True)


def run_sweep(sweep: Sweep, workers: int = 1, worker_command: list[str] | None = None) -> dict[str, Any]:
    """Runs the sweep with `workers` processes (this one, or that many `worker_command` subprocesses sharing the
    storage), then writes DIR/sweep.md. Returns the summary."""
    import subprocess
    import sys

    study = load_study(sweep)  # creates the study (and opens the storage) before any worker starts: bad URLs fail
    if sweep.baseline and not study.get_trials(deepcopy=False):
        study.enqueue_trial(baseline_params(sweep), user_attrs={"baseline": True})
    if workers <= 1 or not worker_command:
        work(sweep)
    else:
        processes = [subprocess.Popen(worker_command) for _ in range(workers)]
        codes = [p.wait() for p in processes]
        if any(codes):
            print(f"crosswrite sweep: {sum(1 for c in codes if c)} of {workers} workers exited with an error",
                  file=sys.stderr)
    return write_summary(sweep, load_study(sweep))


def baseline_params(sweep: Sweep) -> dict[str, Any]:
    """The base config's values of the searched keys (the recipe plus the sweep's --config overrides)."""
    return {key: config_lib.get(sweep.config, key) for key in sweep.space}


def trial_rows(sweep: Sweep, study) -> list[dict[str, Any]]:
    """One row per trial: number, state, values, metric, steps, wall seconds and run directory."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"trial": trial.number, "state": trial.state.name.lower(), "params": dict(trial.params),
                     "baseline": bool(trial.user_attrs.get("baseline")),
                     sweep.metric: trial.value, "steps": trial.user_attrs.get("steps"),
                     "seconds": trial.user_attrs.get("seconds"), "directory": trial.user_attrs.get("directory")})
    return rows


def best_command(sweep: Sweep, params: dict[str, Any]) -> str:
    """The `crosswrite train` command line that reruns a trial's configuration on its own."""
    words = [*sweep.overrides, *(f"--config.{key}={value}" for key, value in params.items())]
    return f"crosswrite train --config {sweep.recipe} --workdir {sweep.workdir}/best_rerun " + " ".join(words)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(sweep: Sweep, study) -> dict[str, Any]:
    """DIR/sweep.md: every trial and the best one's command; returns the summary the CLI prints."""
    rows = trial_rows(sweep, study)
    keys = list(sweep.space)
    lines = [f"# Sweep {sweep.name}: {sweep.direction} {sweep.metric}", "",
             "| trial | state | " + " | ".join(keys) + f" | {sweep.metric} | steps | wall (s) | directory |",
             "|---" * (len(keys) + 6) + "|"]
    for row in rows:
        lines.append(f"| {row['trial']}{' (baseline)' if row['baseline'] else ''} | {row['state']} | "
                     + " | ".join(_cell(row["params"].get(k)) for k in keys)
                     + f" | {_cell(row[sweep.metric])} | {_cell(row['steps'])} | {_cell(row['seconds'])} | "
                     f"{row['directory'] or ''} |")
    complete = [r for r in rows if r["state"] == "complete"]
    summary = {"command": "sweep", "study": sweep.name, "metric": sweep.metric, "direction": sweep.direction,
               "trials": len(rows), "complete": len(complete),
               "pruned": sum(r["state"] == "pruned" for r in rows),
               "failed": sum(r["state"] == "fail" for r in rows)}
    if complete:
        best = study.best_trial
        command = best_command(sweep, best.params)
        lines += ["", f"Best: trial {best.number}, {sweep.metric} {best.value:.4g}, "
                  f"in {best.user_attrs.get('directory')}.", "", "Rerun it on its own:", "", f"    {command}"]
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_directory=str(sweep.workdir / best.user_attrs.get("directory", "")),
                       best_command=command)
        if base := next((r for r in complete if r["baseline"]), None):
            gap = best.value - base[sweep.metric]
            lines += ["", f"Against the baseline (trial {base['trial']}, the recipe's own values): "
                      f"{sweep.metric} {base[sweep.metric]:.4g}, a gap of {gap:+.4g}."]
            summary.update(baseline_value=base[sweep.metric], gap=gap)
    (sweep.workdir / "sweep.md").write_text("\n".join(lines) + "\n")
    return summary


def plot_sweep(workdir: str | Path, out: str | Path, storage_url: str | None = None) -> list[Path]:
    """PNGs of each study in a sweep's storage: optimization history, parameter importances (fANOVA, once finished
    trials differ in their metric) and a slice plot of the metric against each searched key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    storage = open_storage(storage_url, Path(workdir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name in optuna.get_all_study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            drawings = [("history", optuna_plots.plot_optimization_history), ("slice", optuna_plots.plot_slice)]
            if len({t.value for t in complete}) >= 2:  # fANOVA has nothing to attribute when every value is equal
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
                drawings.append(("importances", lambda s: optuna_plots.plot_param_importances(s, evaluator=evaluator)))
            for kind, draw in drawings:
                if not complete:
                    break
                draw(study)
                path = out / f"sweep_{name}_{kind}.png"
                keys = len({key for t in complete for key in t.params})
                plt.gcf().set_size_inches(max(7.0, 3.6 * keys + 1.5) if kind == "slice" else 7.0, 4.5)
                plt.savefig(path, dpi=100, bbox_inches="tight")
                plt.close("all")
                files.append(path)
    return files
