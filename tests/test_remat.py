"""model.remat: every policy keeps the parameter tree and gives the same loss and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from crosswrite_jax.models.transformer import build_model, example_inputs
from crosswrite_jax.state import strip_boxes


def _loss_and_grads(model_config):
    model = build_model(model_config)
    params = strip_boxes(model.init(jax.random.key(0), *example_inputs(model_config)))["params"]
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model_config.vocab_size, (2, 12)), jnp.int32)

    def loss(p):
        logits = model.apply({"params": p}, ids, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_match_no_remat():
    base = dataclasses.replace(tiny_config().model, dropout_rate=0.1)
    loss, grads = _loss_and_grads(base)
    for policy in ("full", "dots_no_batch"):  # "dots" differs from dots_no_batch only in what it saves
        remat_loss, remat_grads = _loss_and_grads(dataclasses.replace(base, remat=policy))
        assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
        np.testing.assert_allclose(remat_loss, loss, rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=policy)
