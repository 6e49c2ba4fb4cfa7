"""Greedy decoding with a key/value cache: the encoder runs once, each step feeds one token."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from crosswrite_jax.models.transformer import PAD_ID, EncoderDecoder


def greedy_decode(model: EncoderDecoder, params: Any, inputs_BS: jax.Array, max_length: int,
                  eos_id: int) -> jax.Array:
    """Token ids [B, max_length] chosen by argmax at every step; PAD after each row's EOS."""
    batch = inputs_BS.shape[0]
    variables = {"params": params}
    encoded = model.apply(variables, inputs_BS, method=model.encode)
    _, allocated = model.apply(
        variables, encoded, inputs_BS, jnp.full((batch, max_length), PAD_ID, jnp.int32),
        decode=True, mutable=["cache"], method=model.decode)

    def step(carry):
        i, tokens, cache, done = carry
        last = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
        logits, updated = model.apply(
            {"params": params, "cache": cache}, encoded, inputs_BS, last,
            decode=True, position=i, cache_length=max_length, mutable=["cache"], method=model.decode)
        next_token = jnp.where(done, PAD_ID, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_token[:, None], i + 1, axis=1)
        return i + 1, tokens, updated["cache"], done | (next_token == eos_id)

    def keep_going(carry):
        i, _, _, done = carry
        return (i < max_length) & ~jnp.all(done)

    tokens = jnp.full((batch, max_length + 1), PAD_ID, jnp.int32)
    init = (jnp.zeros((), jnp.int32), tokens, allocated["cache"], jnp.zeros((batch,), bool))
    _, tokens, _, _ = jax.lax.while_loop(keep_going, step, init)
    return tokens[:, 1:]


def make_greedy_decoder(model: EncoderDecoder, max_length: int, eos_id: int, param_shardings: Any,
                        batch_sharding: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted `(params, inputs) -> token ids`, sharded like training."""
    return jax.jit(lambda params, inputs: greedy_decode(model, params, inputs, max_length, eos_id),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=batch_sharding)
