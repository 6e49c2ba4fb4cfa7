"""Stress: SIGKILL `crosswrite train` at random moments while async saves run; every rerun must resume.

Each trial trains a fresh workdir (40 steps, an async save every 2 steps, 3 kept). A random 0-3 s after the first
checkpoint directory appears, it waits for an Orbax temporary directory (a save under way) and kills the process
group with SIGKILL a random 0-20 ms later. The temporary directories still on disk after the kill prove that it
landed inside an unfinished save. The rerun of the same command must exit 0 having resumed from the newest
committed step, reach step 40 with final parameters bitwise-equal to an uninterrupted run's, leave no Orbax
temporary directory behind, and leave only steps that verify against their manifests. Trials go on until 10 kills
have landed inside an unfinished save (at most 25 trials).

    python -m pytest -m slow -n 0 tests/test_kill_during_save.py
    python tests/test_kill_during_save.py --landed 20 --seed 3     # as a script; exit status 1 on a failure

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
LANDED = 10  # kills that must land inside an unfinished save
MAX_TRIALS = 25
MAX_DELAY_S = 3.0
SAVE_WAIT_S = 5.0
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

    @property
    def landed_in_save(self) -> bool:
        return self.killed and bool(self.tmp_at_kill)

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
    """Orbax temporary directories and files under `checkpoints` (os.walk: a step deleted mid-walk is skipped)."""
    found = []
    for root, dirs, files in os.walk(checkpoints):
        found += [(Path(root) / name).relative_to(checkpoints).as_posix() for name in dirs + files
                  if integrity.TMP_STEP_DIR.match(name) or ".orbax-checkpoint-tmp" in name]
    return sorted(found)


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
            deadline = time.monotonic() + SAVE_WAIT_S
            while proc.poll() is None and time.monotonic() < deadline and not _tmp_anywhere(checkpoints):
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.02))
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


def _final_params(workdir: Path):
    """The step-40 parameters of a run, restored on one device."""
    import jax

    from crosswrite_jax import checkpoint, sharding
    from crosswrite_jax import config as config_lib
    from crosswrite_jax.trainer import Trainer

    config = config_lib.load(workdir / "config.json")
    trainer = Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    manager = checkpoint.open_manager(workdir / "checkpoints", read_only=True)
    try:
        params, _, step = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
    finally:
        manager.close()
    assert step == STEPS, step
    return jax.device_get(params)


def _differing_leaves(a, b) -> list[str]:
    import jax
    import numpy as np

    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    if [p for p, _ in flat_a] != [p for p, _ in flat_b]:
        return ["the parameter trees differ"]
    return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(flat_a, flat_b) if not np.array_equal(x, y)]


def run_trials(base: Path, landed: int = LANDED, seed: int = 0, max_trials: int = MAX_TRIALS,
               out=print) -> list[Trial]:
    """Warm-up run (uninterrupted), then kill-and-rerun trials under `base` until `landed` kills landed inside an
    unfinished save (or `max_trials` ran); returns them, printing a line each."""
    started = time.monotonic()
    env = _env(base / "jax-cache")
    warm = base / "warm-up"
    done = subprocess.run(_command(warm), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = _final_params(warm)
    rng = random.Random(seed)
    results = []
    while sum(t.landed_in_save for t in results) < landed and len(results) < max_trials:
        trial = _run_trial(len(results), rng, base, warm / "tokenizer", env)
        if not trial.failures and (differ := _differing_leaves(_final_params(base / f"trial{trial.index}"),
                                                               uninterrupted)):
            trial.failures.append(f"final parameters differ from the uninterrupted run's at {differ[:3]}")
        out(trial.line())
        results.append(trial)
    survived = sum(not t.failures for t in results)
    out(f"kill during save: {len(results)} trials run, {sum(t.killed for t in results)} killed mid-run, "
        f"{sum(t.landed_in_save for t in results)} inside an unfinished save; {survived} survived (bitwise-equal "
        f"to the uninterrupted run), {time.monotonic() - started:.0f} s")
    return results


@pytest.mark.slow
def test_sigkill_during_async_saves_always_resumes_from_a_committed_step(tmp_path, capsys):
    landed = int(os.environ.get("CROSSWRITE_KILL_LANDED", LANDED))
    results = run_trials(tmp_path, landed, seed=int(os.environ.get("CROSSWRITE_KILL_SEED", 0)))
    with capsys.disabled():
        print()
        for trial in results:
            print(trial.line())
    failed = [t.line() for t in results if t.failures]
    assert not failed, "\n".join(failed)
    assert sum(t.landed_in_save for t in results) >= landed, f"fewer than {landed} kills landed inside a save"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landed", type=int, default=LANDED, help="kills inside an unfinished save to reach")
    parser.add_argument("--max-trials", type=int, default=MAX_TRIALS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="run under this directory and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.keep:
        base = Path(args.keep)
        base.mkdir(parents=True, exist_ok=True)
        results = run_trials(base, args.landed, args.seed, args.max_trials)
    else:
        with tempfile.TemporaryDirectory(prefix="kill-during-save-") as tmp:
            results = run_trials(Path(tmp), args.landed, args.seed, args.max_trials)
    enough = sum(t.landed_in_save for t in results) >= args.landed
    return 0 if enough and all(not t.failures for t in results) else 1


if __name__ == "__main__":
    sys.exit(main())
