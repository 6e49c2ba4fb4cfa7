"""token_losses (written without one-hot targets or argmax) against the textbook definitions via optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crosswrite_jax.losses import token_losses


def reference(logits, targets, weights, smoothing):
    vocab = logits.shape[-1]
    soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab), smoothing)
    loss = optax.softmax_cross_entropy(logits, soft)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sums_and_gradients_match_the_definition(smoothing):
    keys = jax.random.split(jax.random.key(0), 3)
    logits = 4.0 * jax.random.normal(keys[0], (3, 7, 50))
    targets = jax.random.randint(keys[1], (3, 7), 0, 50)
    # make some targets the argmax so that 'correct' is neither 0 nor all
    logits = logits.at[0, :4].set(logits[0, :4].at[jnp.arange(4), targets[0, :4]].set(30.0))
    weights = (jax.random.uniform(keys[2], (3, 7)) > 0.3).astype(jnp.float32)
    ours, theirs = token_losses(logits, targets, weights, smoothing), reference(logits, targets, weights, smoothing)
    assert 0 < float(theirs["correct"]) < float(theirs["tokens"])
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=2e-5, err_msg=key)
    grad = lambda fn: jax.grad(lambda x: fn(x, targets, weights, smoothing)["loss_sum"])(logits)  # noqa: E731
    np.testing.assert_allclose(grad(token_losses), grad(reference), atol=1e-6)


def test_ties_count_as_argmax_does():
    """Equal logits (a zero-initialised head) are correct only for the lowest id, as argmax picks it."""
    logits = jnp.zeros((2, 3, 5)).at[1, 2, 4].set(1.0).at[1, 2, 3].set(1.0)
    targets = jnp.array([[0, 1, 4], [0, 2, 3]])
    ours = token_losses(logits, targets, jnp.ones((2, 3)), 0.0)
    theirs = reference(logits, targets, jnp.ones((2, 3)), 0.0)
    assert float(ours["correct"]) == float(theirs["correct"]) == 3.0
