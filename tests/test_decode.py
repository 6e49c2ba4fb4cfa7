"""Greedy decoding with the key/value cache equals argmax over full uncached forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from conftest import tiny_config
from crosswrite_jax.decode import greedy_decode
from crosswrite_jax.models.transformer import EncoderDecoder


def test_cached_greedy_equals_uncached_argmax():
    config = tiny_config(model__dropout_rate=0.0, model__tie_output_embedding=False).model
    model = EncoderDecoder(config)
    inputs = jax.random.randint(jax.random.key(1), (4, 9), 3, config.vocab_size).at[0, 6:].set(0)
    params = nn.unbox(model.init(jax.random.key(0), inputs, inputs))["params"]
    # Sharpen the output layer so different positions prefer different tokens.
    params["output"]["kernel"] = params["output"]["kernel"] * 8.0
    steps = 12
    cached = np.asarray(jax.jit(lambda p, x: greedy_decode(model, p, x, steps, eos_id=1))(params, inputs))

    # Full teacher-forced passes: the logits at position i see targets < i only (causal), so
    # filling one position per pass reproduces step-by-step argmax without any cache.
    forward = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))
    expected = np.zeros((4, steps), np.int32)
    for i in range(steps):
        expected[:, i] = np.argmax(np.asarray(forward(params, inputs, jnp.asarray(expected)))[:, i], axis=-1)
    for row_cached, row_expected in zip(cached, expected):
        eos = np.flatnonzero(row_expected == 1)
        end = eos[0] + 1 if eos.size else steps
        np.testing.assert_array_equal(row_cached[:end], row_expected[:end])
        assert (row_cached[end:] == 0).all()  # padding after EOS
    assert len({tuple(r) for r in expected}) > 1 and len(set(expected[0])) > 2  # a non-trivial case
