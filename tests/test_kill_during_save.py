"""Stress: SIGKILL `crosswrite train` at random moments while async saves run; every rerun must resume.

Each trial trains a fresh workdir (40 steps, an async save every 2 steps, 3 kept), kills the process group
with SIGKILL a random 0-3 s after the first checkpoint directory appears, then reruns the same command,
which must exit 0 having resumed from the newest committed step, reach step 40, leave no Orbax temporary
directory behind, and leave only steps that verify against their manifests.

    python -m pytest -m slow tests/test_kill_during_save.py
    python tests/test_kill_during_save.py --trials 20 --seed 3     # as a script; exit status 1 on a failure

A warm-up run first fills a JAX compilation cache and trains the tokenizer that each trial's workdir starts
with, so that a trial costs about 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import QUICKSTART  # noqa: E402
from test_cli import CROSSWRITE, _overrides  # noqa: E402

from crosswrite_jax import integrity  # noqa: E402

STEPS = 40
EXTRA = {"train.steps": STEPS, "checkpoint.every": 2, "checkpoint.async_save": "true", "checkpoint.max_to_keep": 3}
TRIALS = 10
MAX_DELAY_S = 3.0
RESUMED = re.compile(r"resumed from step (\d+)")


@dataclass
class Trial:
    index: int
    delay_s: float
    killed: bool = False
    committed_at_kill: list[int] = field(default_factory=list)
    tmp_at_kill: list[str] = field(default_factory=list)
    last_logged_at_kill: int = 0
    resumed_from: int | None = None
    final_steps: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        kill = (f"killed {self.delay_s:.2f}s after the first save (logged step {self.last_logged_at_kill}, "
                f"committed {self.committed_at_kill}, unfinished {self.tmp_at_kill})" if self.killed
                else "finished before the kill")
        resumed = "fresh start" if self.resumed_from is None else f"resumed from {self.resumed_from}"
        verdict = "ok" if not self.failures else "FAILED: " + "; ".join(self.failures)
        return f"trial {self.index}: {kill}; rerun {resumed}; final steps {self.final_steps}: {verdict}"


def _env(cache_dir: Path) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                TRANSFORMERS_NO_ADVISORY_WARNINGS="1", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _command(workdir: Path) -> list[str]:
    return [CROSSWRITE, "train", "--config", str(QUICKSTART), "--workdir", str(workdir), *_overrides(EXTRA)]


def _records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"split": "unparsable", "line": line})
    return out


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r.get("split") == "train"]


def _tmp_anywhere(checkpoints: Path) -> list[str]:
    return sorted(p.relative_to(checkpoints).as_posix() for p in checkpoints.rglob("*")
                  if integrity.TMP_STEP_DIR.match(p.name) or ".orbax-checkpoint-tmp" in p.name)


def _run_trial(index: int, rng: random.Random, base: Path, tokenizer: Path, env: dict[str, str]) -> Trial:
    trial = Trial(index, delay_s=rng.uniform(0.0, MAX_DELAY_S))
    workdir = base / f"trial{index}"
    checkpoints = workdir / "checkpoints"
    shutil.copytree(tokenizer, workdir / "tokenizer")
    with open(base / f"trial{index}.killed.log", "w") as log:
        proc = subprocess.Popen(_command(workdir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
                if time.monotonic() > deadline:
                    raise TimeoutError("no checkpoint after 180 s")
                time.sleep(0.01)
            time.sleep(trial.delay_s)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                trial.killed = True
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not trial.killed and proc.returncode != 0:
        trial.failures.append(f"the first run exited {proc.returncode} before the kill")
    trial.committed_at_kill = sorted(integrity.step_dirs(checkpoints))
    trial.tmp_at_kill = [p.name for p in integrity.leftover_tmp_dirs(checkpoints)]
    before = _records(workdir)
    trial.last_logged_at_kill = max(_train_steps(before), default=0)

    rerun = subprocess.run(_command(workdir), capture_output=True, text=True, env=env, timeout=300)
    (base / f"trial{index}.rerun.log").write_text(rerun.stdout + rerun.stderr)
    if rerun.returncode != 0:
        trial.failures.append(f"rerun exited {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}")
    match = RESUMED.search(rerun.stderr)
    trial.resumed_from = int(match.group(1)) if match else None
    newest = max(trial.committed_at_kill, default=None)
    if trial.resumed_from != newest:
        trial.failures.append(f"resumed from {trial.resumed_from}, the newest committed step was {newest}")
    if "corrupt" in rerun.stderr:
        trial.failures.append("the rerun found a corrupt step")

    after = _records(workdir)
    if any(r.get("split") == "unparsable" for r in after):
        trial.failures.append("metrics.jsonl has an unparsable line")
    rerun_steps = _train_steps(after[len(before):])
    start = trial.resumed_from or 0
    if start < STEPS and rerun_steps != list(range(start + 1, STEPS + 1)):
        trial.failures.append(f"the rerun logged steps {rerun_steps[:3]}...{rerun_steps[-2:]}, "
                              f"expected {start + 1}..{STEPS}")
    if max(_train_steps(after), default=0) != STEPS:
        trial.failures.append(f"the run did not reach step {STEPS}")

    if leftovers := _tmp_anywhere(checkpoints):
        trial.failures.append(f"temporary directories left: {leftovers}")
    if aside := [p.name for p in checkpoints.iterdir() if integrity.SET_ASIDE_DIR.match(p.name)]:
        trial.failures.append(f"steps set aside as corrupt: {aside}")
    steps = integrity.step_dirs(checkpoints)
    trial.final_steps = sorted(steps)
    if not steps or max(steps) != STEPS:
        trial.failures.append(f"the newest step is not {STEPS}")
    for step, path in steps.items():
        # Steps before the newest got their manifest when the rerun saved the next one (if it saved any).
        strict = start < STEPS and step < STEPS
        if problems := integrity.verify_step(path, strict=strict):
            trial.failures.append(f"step {step}: {'; '.join(problems)}")
    return trial


def run_trials(base: Path, trials: int = TRIALS, seed: int = 0, out=print) -> list[Trial]:
    """Warm-up run, then `trials` kill-and-rerun trials under `base`; returns them, printing a line each."""
    started = time.monotonic()
    env = _env(base / "jax-cache")
    warm = base / "warm-up"
    done = subprocess.run(_command(warm), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        trial = _run_trial(i, rng, base, warm / "tokenizer", env)
        out(trial.line())
        results.append(trial)
    survived = sum(not t.failures for t in results)
    killed = sum(t.killed for t in results)
    out(f"kill during save: {len(results)} trials run ({killed} killed mid-run), {survived} survived, "
        f"{time.monotonic() - started:.0f} s")
    return results


@pytest.mark.slow
def test_sigkill_during_async_saves_always_resumes_from_a_committed_step(tmp_path, capsys):
    trials = int(os.environ.get("CROSSWRITE_KILL_TRIALS", TRIALS))
    results = run_trials(tmp_path, trials, seed=int(os.environ.get("CROSSWRITE_KILL_SEED", 0)))
    with capsys.disabled():
        print()
        for trial in results:
            print(trial.line())
    failed = [t.line() for t in results if t.failures]
    assert not failed, "\n".join(failed)
    assert len(results) >= trials and sum(t.killed for t in results) >= trials // 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="run under this directory and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.keep:
        base = Path(args.keep)
        base.mkdir(parents=True, exist_ok=True)
        results = run_trials(base, args.trials, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="kill-during-save-") as tmp:
            results = run_trials(Path(tmp), args.trials, args.seed)
    return 0 if all(not t.failures for t in results) else 1


if __name__ == "__main__":
    sys.exit(main())
