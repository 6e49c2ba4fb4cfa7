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


def segment_mask(query_segments_BT: Array, key_segments_BS: Array) -> Array:
    """[B, 1, T, S] True where query and key belong to the same packed example (segment 0 is padding)."""
    same = query_segments_BT[:, None, :, None] == key_segments_BS[:, None, None, :]
    return same & (key_segments_BS != 0)[:, None, None, :]


def shift_right(targets_BT: Array, positions_BT: Array | None = None) -> Array:
    """Decoder inputs: targets moved one step right behind the start token (at every packed example's start)."""
    shifted = jnp.pad(targets_BT, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]
    if positions_BT is None:
        return shifted
    return jnp.where(positions_BT == 0, PAD_ID, shifted)


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

    def _embed(self, ids_BT: Array, offset: Array | int = 0, positions_BT: Array | None = None) -> Array:
        table = jnp.asarray(self.positions)
        if positions_BT is None:
            positions = jax.lax.dynamic_slice_in_dim(table, offset, ids_BT.shape[1])[None]
        else:
            positions = jnp.take(table, positions_BT, axis=0)
        x = self.embed(ids_BT) + positions.astype(self.dtype)
        return constrain(x, "batch", "length", "embed")

    def encode(self, inputs_BS: Array, deterministic: bool = True, segments_BS: Array | None = None,
               positions_BS: Array | None = None) -> Array:
        """Encoder outputs [B, S, D]; with segment ids, packed examples do not see each other."""
        mask = padding_mask(inputs_BS) if segments_BS is None else segment_mask(segments_BS, segments_BS)
        return self.encoder(self._embed(inputs_BS, 0, positions_BS), mask, deterministic=deterministic)

    def decode(self, encoded: Array, inputs_BS: Array, decoder_inputs_BT: Array, deterministic: bool = True,
               decode: bool = False, position: Array | int = 0, input_segments_BS: Array | None = None,
               segments_BT: Array | None = None, positions_BT: Array | None = None) -> Array:
        """Logits [B, T, V] for decoder inputs; with `decode`, one cached step at `position`."""
        if segments_BT is None:
            self_mask = None if decode else causal_mask(decoder_inputs_BT.shape[1])
            cross_mask = padding_mask(inputs_BS)
        else:
            self_mask = causal_mask(decoder_inputs_BT.shape[1]) & segment_mask(segments_BT, segments_BT)
            cross_mask = segment_mask(segments_BT, input_segments_BS)
        x = self._embed(decoder_inputs_BT, position, positions_BT)
        y = self.decoder(x, self_mask, encoded, cross_mask, deterministic=deterministic, decode=decode)
        if self.config.tie_output_embedding:
            logits = self.embed.attend(y) * jnp.asarray(self.config.d_model**-0.5, self.dtype)
        else:
            logits = self.output(y)
        return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)

    def __call__(self, inputs: Array, targets: Array, deterministic: bool = True,
                 inputs_segments: Array | None = None, inputs_positions: Array | None = None,
                 targets_segments: Array | None = None, targets_positions: Array | None = None) -> Array:
        """Teacher-forced logits [B, T, V] predicting `targets` [B, T]; segment/position arrays for packed rows."""
        encoded = self.encode(inputs, deterministic, inputs_segments, inputs_positions)
        return self.decode(encoded, inputs, shift_right(targets, targets_positions), deterministic,
                           input_segments_BS=inputs_segments, segments_BT=targets_segments,
                           positions_BT=targets_positions)


def build_model(config: ModelConfig) -> EncoderDecoder:
    """The model a config describes."""
    return EncoderDecoder(config)
