"""Encoder, decoder and the encoder-decoder Transformer, built from the shared layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from crosswrite_jax.config import ModelConfig
from crosswrite_jax.models.layers import DTYPES, Dense, Embed, Norm, TransformerBlock, constrain, sinusoidal_positions

Array = jax.Array
PAD_ID = 0  # also the decoder's start token


def padding_mask(ids_BS: Array) -> Array:
    """[B, 1, 1, S] True where keys are real tokens."""
    return (ids_BS != PAD_ID)[:, None, None, :]


def causal_mask(length: int) -> Array:
    """[1, 1, T, T] True where a query may see a key."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def shift_right(targets_BT: Array) -> Array:
    """Decoder inputs: targets moved one step right behind the start token."""
    return jnp.pad(targets_BT, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]


class Stack(nn.Module):
    """Embedded tokens through N blocks and a final norm; encoder or decoder by `cross_attention`."""

    config: ModelConfig
    num_layers: int
    cross_attention: bool

    @nn.compact
    def __call__(self, x: Array, self_mask, encoded=None, cross_mask=None, deterministic=True, decode=False):
        c = self.config
        dtype = DTYPES[c.dtype]
        head_dim = c.head_dim or c.d_model // c.num_heads
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        for i in range(self.num_layers):
            x = TransformerBlock(
                c.num_heads, head_dim, c.d_ff, c.activation, c.norm, c.norm_epsilon, c.dropout_rate,
                cross_attention=self.cross_attention, dtype=dtype, name=f"layer_{i}",
            )(x, self_mask, encoded, cross_mask, deterministic=deterministic, decode=decode)
        x = Norm(c.norm, c.norm_epsilon, dtype, name="final_norm")(x)
        return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence Transformer with shared token embeddings (Vaswani et al., pre-norm)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.dtype = DTYPES[c.dtype]
        self.embed = Embed(c.vocab_size, c.d_model, self.dtype, name="token_embed")
        self.encoder = Stack(c, c.num_encoder_layers, cross_attention=False, name="encoder")
        self.decoder = Stack(c, c.num_decoder_layers, cross_attention=True, name="decoder")
        if not c.tie_output_embedding:
            self.output = Dense((c.vocab_size,), 1, ("embed", "vocab"), self.dtype, name="output")
        self.positions = sinusoidal_positions(c.max_length, c.d_model)

    def _embed(self, ids_BT: Array, offset: Array | int = 0) -> Array:
        positions = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.positions), offset, ids_BT.shape[1])
        x = self.embed(ids_BT) + positions[None].astype(self.dtype)
        return constrain(x, "batch", "length", "embed")

    def encode(self, inputs_BS: Array, deterministic: bool = True) -> Array:
        """Encoder outputs [B, S, D]."""
        return self.encoder(self._embed(inputs_BS), padding_mask(inputs_BS), deterministic=deterministic)

    def decode(self, encoded: Array, inputs_BS: Array, decoder_inputs_BT: Array, deterministic: bool = True,
               decode: bool = False, position: Array | int = 0) -> Array:
        """Logits [B, T, V] for decoder inputs; with `decode`, one cached step at `position`."""
        length = decoder_inputs_BT.shape[1]
        self_mask = None if decode else causal_mask(length)
        x = self._embed(decoder_inputs_BT, position)
        y = self.decoder(x, self_mask, encoded, padding_mask(inputs_BS), deterministic=deterministic, decode=decode)
        if self.config.tie_output_embedding:
            logits = self.embed.attend(y) * jnp.asarray(self.config.d_model**-0.5, self.dtype)
        else:
            logits = self.output(y)
        return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)

    def __call__(self, inputs_BS: Array, targets_BT: Array, deterministic: bool = True) -> Array:
        """Teacher-forced logits [B, T, V] predicting `targets`."""
        encoded = self.encode(inputs_BS, deterministic)
        return self.decode(encoded, inputs_BS, shift_right(targets_BT), deterministic)


def build_model(config: ModelConfig) -> EncoderDecoder:
    """The model a config describes."""
    return EncoderDecoder(config)
