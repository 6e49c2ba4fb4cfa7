"""Non-finite steps leave the state untouched; SIGTERM saves and the rerun resumes at the next step."""

import json
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import QUICKSTART, assert_trees_equal, tiny_config
from test_cli import CROSSWRITE, _overrides

import crosswrite_jax.losses as losses_lib
from crosswrite_jax import checkpoint, sharding
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.train import NonFiniteError, train
from crosswrite_jax.trainer import Trainer

POISON = 3  # a target id that makes the patched loss NaN


def _poisoned_losses(original):
    def token_losses(logits, targets, weights, label_smoothing):
        sums = original(logits, targets, weights, label_smoothing)
        poisoned = (targets == POISON).any()
        return dict(sums, loss_sum=jax.numpy.where(poisoned, jax.numpy.nan, sums["loss_sum"]))
    return token_losses


def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged(monkeypatch):
    monkeypatch.setattr(losses_lib, "token_losses", _poisoned_losses(losses_lib.token_losses))
    trainer = Trainer.build(tiny_config(), sharding.make_mesh((2, 2, 2)))
    step = trainer.jit_train_step()
    rng = np.random.default_rng(0)
    clean = {"inputs": rng.integers(4, 500, (16, 16), dtype=np.int32),
             "targets": rng.integers(4, 500, (16, 16), dtype=np.int32)}
    poisoned = {"inputs": clean["inputs"], "targets": clean["targets"].copy()}
    poisoned["targets"][5, 3] = POISON
    with trainer.context():
        state, metrics = step(trainer.init_state(), to_global_batch(clean, trainer.mesh))
        assert float(metrics["nonfinite"]) == 0.0
        before = jax.device_get((state.params, state.opt_state))
        state, metrics = step(state, to_global_batch(poisoned, trainer.mesh))
        assert float(metrics["nonfinite"]) == 1.0
        assert int(state.step) == 2  # the batch is consumed, the update is not applied
        assert_trees_equal(jax.device_get((state.params, state.opt_state)), before)
        state, metrics = step(state, to_global_batch(clean, trainer.mesh))
        assert float(metrics["nonfinite"]) == 0.0
        embedding = jax.device_get(state.params)["embed"]["token_embed"]["embedding"]
        changed = embedding != before[0]["embed"]["token_embed"]["embedding"]
        assert changed.any()


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch, caplog):
    config = tiny_config(train__steps=20, checkpoint__every=2, train__max_nonfinite_steps=3)
    workdir = tmp_path / "run"
    train(config, workdir, stop_at=4)
    steps_dir = workdir / "checkpoints"
    trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))

    def saved_params():
        manager = checkpoint.open_manager(steps_dir, read_only=True)
        params, _, step = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
        manager.close()
        return params, step

    params_before, step_before = saved_params()
    original = losses_lib.token_losses
    monkeypatch.setattr(losses_lib, "token_losses",
                        lambda logits, targets, w, ls: dict(original(logits, targets, w, ls), loss_sum=jax.numpy.nan))
    with pytest.raises(NonFiniteError, match="3 consecutive steps with non-finite"):
        train(config, workdir)
    assert "loss or gradients not finite; update skipped" in caplog.text
    params_after, step_after = saved_params()
    assert step_after == step_before == 4
    assert_trees_equal(params_after, params_before)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_and_the_rerun_resumes_at_the_next_step(tmp_path, signum, code):
    """SIGTERM (a preemption) and a first Ctrl-C both save at the step boundary; Ctrl-C then exits 130."""
    workdir = tmp_path / "run"

    def command(steps):
        return [CROSSWRITE, "train", "--config", str(QUICKSTART), "--workdir", str(workdir),
                *_overrides({"train.steps": steps, "checkpoint.every": 100000, "checkpoint.async_save": True})]

    process = subprocess.Popen(command(100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    stopped = int(re.search(r"preempted: saved step (\d+)", stderr).group(1))
    if signum == signal.SIGTERM:
        assert json.loads(stdout.strip().splitlines()[-1])["preempted_at"] == stopped
    else:
        assert "crosswrite: interrupted" in stderr and "Traceback" not in stderr
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [stopped]

    rerun = subprocess.run(command(stopped + 3), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from step {stopped}" in rerun.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, stopped + 4))  # no step lost, none repeated
    assert [r["step"] for r in records if r["split"] == "summary"] == [stopped, stopped + 3]  # one per invocation
