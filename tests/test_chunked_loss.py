"""Chunked output projection + cross-entropy: the full step's numbers, with a fraction of the logits' memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_grad_accumulation import _batch, _step

from crosswrite_jax import sharding
from crosswrite_jax.config import ModelConfig
from crosswrite_jax.errors import UserError
from crosswrite_jax.losses import task_losses
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.tasks import check_config, get_task
from crosswrite_jax.trainer import Trainer


@pytest.mark.parametrize("mesh_shape,chunk,accumulation", [((2, 2, 2), 5, 1), ((1, 1, 1), 8, 1), ((1, 1, 1), 5, 4)])
def test_chunked_step_equals_the_full_step(mesh_shape, chunk, accumulation):
    """5 does not divide the 16 target positions: the padded tail chunk must carry no weight. With gradient
    accumulation the chunked loss's custom gradient runs inside the scan over microbatches."""
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    config = tiny_config(mesh__rules="fsdp_tp", train__label_smoothing=0.1)
    batch = _batch(config.model.vocab_size, rows=16 if mesh_shape[0] == 1 else 32)
    full_params, full = _step(config, batch, mesh)
    chunked_params, chunked = _step(tiny_config(mesh__rules="fsdp_tp", train__label_smoothing=0.1,
                                                train__logits_chunk_length=chunk,
                                                train__grad_accum_steps=accumulation), batch, mesh)
    for key in ("loss_sum", "nll_sum", "correct", "tokens"):
        np.testing.assert_allclose(chunked[key], full[key], rtol=1e-5)
    np.testing.assert_allclose(chunked["grad_norm"], full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunked_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_and_gradients_of_an_untied_decoder_match():
    config = ModelConfig(family="decoder", num_encoder_layers=0, num_decoder_layers=1, vocab_size=97, d_model=32,
                         num_heads=4, d_ff=64, max_length=32, position="rope", norm="rmsnorm", gated_mlp=True,
                         activation="silu", tie_output_embedding=False, dropout_rate=0.0)
    model, task = build_model(config), get_task("causal_lm")
    targets = np.random.default_rng(1).integers(3, 97, (4, 12), dtype=np.int32)
    targets[1, 7:] = 0
    batch = {"targets": jnp.asarray(targets)}
    params = model.init(jax.random.key(0), batch["targets"])["params"]

    def loss(p, chunk):
        sums = task_losses(model, task, {"params": p}, batch, True, {}, 0.0, chunk)
        return sums["loss_sum"], sums

    (full, full_sums), full_grads = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (chunked, chunked_sums), chunked_grads = jax.value_and_grad(loss, has_aux=True)(params, 5)
    np.testing.assert_allclose(chunked, full, rtol=1e-5)
    assert chunked_sums["tokens"] == full_sums["tokens"] == (targets != 0).sum()
    # One pass over the chunks takes the gradients too: no second (backward) scan recomputing the projection,
    # and in it the three matmuls of the untied projection (forward, kernel gradient, input gradient).
    gradient = jax.make_jaxpr(jax.grad(lambda p: loss(p, 5)[0]))(params)
    scans = [e for e in gradient.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    assert sum(e.primitive.name == "dot_general" for e in scans[0].params["jaxpr"].jaxpr.eqns) == 3
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_predictions", [0, 6])
def test_chunked_mlm_loss_and_gradients_match(max_predictions):
    """The MLM head (transform, norm, tied projection, bias) in chunks of 5 positions: over every position, and
    over the first 6 masked positions of a row (5 does not divide either)."""
    from crosswrite_jax.models.presets import bert

    config = bert(num_encoder_layers=1, vocab_size=97, d_model=32, num_heads=4, d_ff=64, max_length=32, head="mlm",
                  pooler=False, dropout_rate=0.0, mlm_max_predictions=max_predictions)
    model, task = build_model(config), get_task("mlm")
    rng = np.random.default_rng(2)
    inputs = rng.integers(5, 97, (4, 12), dtype=np.int32)
    targets = np.where(rng.random((4, 12)) < 0.4, inputs, 0).astype(np.int32)
    inputs[1, 9:], targets[1, 9:] = 0, 0
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    params = model.init(jax.random.key(0), batch["inputs"])["params"]

    def loss(p, chunk):
        sums = task_losses(model, task, {"params": p}, batch, True, {}, 0.0, chunk)
        return sums["loss_sum"], sums

    # The chunked loss really is a scan over chunks (and the full one is not).
    assert "scan" in str(jax.make_jaxpr(lambda p: loss(p, 5))(params)) and \
        "scan" not in str(jax.make_jaxpr(lambda p: loss(p, 0))(params))
    (full, full_sums), full_grads = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (chunked, chunked_sums), chunked_grads = jax.value_and_grad(loss, has_aux=True)(params, 5)
    np.testing.assert_allclose(chunked, full, rtol=1e-5)
    predicted = sum(min(int(n), max_predictions or 12) for n in (targets != 0).sum(1))
    assert chunked_sums["tokens"] == full_sums["tokens"] == predicted
    assert chunked_sums["correct"] == full_sums["correct"]
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunking_shrinks_the_compiled_step_by_about_the_logits():
    """16 x 64 targets over an 8,192 vocabulary: 32 MiB of float32 logits (and as much again for their
    gradient) in the full step, an eighth of that per chunk of 8 positions."""
    overrides = dict(model__vocab_size=8192, data__max_source_length=64, data__max_target_length=64,
                     train__batch_size=16)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    batch = _batch(8192, rows=16, length=64)
    temp = {}
    for chunk in (0, 8):
        trainer = Trainer.build(tiny_config(**overrides, train__logits_chunk_length=chunk), mesh)
        with trainer.context():
            state = trainer.init_state()
            compiled = trainer.jit_train_step().lower(state, to_global_batch(batch, mesh)).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[0] - temp[8] > 32 * 2**20, temp


def test_chunking_needs_vocabulary_outputs():
    with pytest.raises(UserError, match="train.logits_chunk_length"):
        check_config(tiny_config(task="classification", model__family="encoder", model__num_decoder_layers=0,
                                 model__head="classification", train__logits_chunk_length=8))
    with pytest.raises(UserError, match="train.logits_chunk_length"):
        tiny_config(train__logits_chunk_length=-1)
