"""Gradient accumulation: microbatches in a scan give the full batch's step, on a sharded mesh too."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from crosswrite_jax import sharding
from crosswrite_jax.errors import UserError
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.train import train
from crosswrite_jax.trainer import Trainer


def _batch(vocab: int, rows: int = 16, length: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, vocab, (rows, length), dtype=np.int32)
    targets = rng.integers(3, vocab, (rows, length), dtype=np.int32)
    inputs[:, 12:] = 0
    targets[::3, 9:] = 0  # microbatches hold different token counts: normalising by the total matters
    targets[1::4, 5:] = 0
    return {"inputs": inputs, "targets": targets}


def _step(config, batch, mesh):
    trainer = Trainer.build(config, mesh)
    state = trainer.init_state()
    with trainer.context():
        state, metrics = trainer.jit_train_step()(state, to_global_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 1)])
def test_accumulated_step_equals_full_batch(mesh_shape):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices)
    config = tiny_config(mesh__rules="fsdp_tp")
    batch = _batch(config.model.vocab_size, rows=16 if mesh_shape[0] == 1 else 32)
    full_params, full = _step(config, batch, mesh)
    accum_params, accum = _step(tiny_config(mesh__rules="fsdp_tp", train__grad_accum_steps=4), batch, mesh)
    for key in ("loss_sum", "nll_sum", "correct", "tokens"):
        np.testing.assert_allclose(accum[key], full[key], rtol=1e-5)
    np.testing.assert_allclose(accum["grad_norm"], full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_accumulation_trains_through_train(tmp_path):
    config = tiny_config(train__grad_accum_steps=2, train__steps=3, checkpoint__every=3)
    metrics = train(config, tmp_path / "run")
    assert np.isfinite(metrics["loss"]) and metrics["tokens"] > 0


def test_accumulation_must_divide_the_batch():
    with pytest.raises(UserError, match="train.grad_accum_steps"):
        tiny_config(train__grad_accum_steps=3)
    with pytest.raises(UserError, match="train.grad_accum_steps"):
        tiny_config(train__grad_accum_steps=0)
