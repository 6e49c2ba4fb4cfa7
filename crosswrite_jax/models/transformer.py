"""Encoder-only, decoder-only and encoder-decoder Transformers, all built from the shared layers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from crosswrite_jax.config import SCANNED_LAYERS, ModelConfig
from crosswrite_jax.data.tokenizer import PAD_ID  # also the decoder's start token
from crosswrite_jax.models.layers import (
    ACTIVATIONS,
    DTYPES,
    Dense,
    Embed,
    Norm,
    RelativePositionBias,
    TransformerBlock,
    constrain,
    sinusoidal_positions,
)

Array = jax.Array
LAYER_STACKS = ("encoder", "decoder")  # the top-level names of the layer stacks; no output head uses them
_LAYER = re.compile(r"layer_(\d+)")


def stack_layers(params: dict) -> dict:
    """An unrolled tree ('<stack>/layer_<i>/...') in model.scan_layers' layout ('<stack>/layers/...', layer i at
    index i of a new leading axis); numpy leaves stay numpy."""
    out = dict(params)
    for name in LAYER_STACKS:
        if name not in params:
            continue
        layers = {int(m.group(1)): v for k, v in params[name].items() if (m := _LAYER.fullmatch(k))}
        rest = {k: v for k, v in params[name].items() if not _LAYER.fullmatch(k)}
        if layers:
            ordered = [layers[i] for i in range(len(layers))]
            rest[SCANNED_LAYERS] = jax.tree.map(
                lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs), *ordered)
        out[name] = rest
    return out


def unstack_layers(params: dict) -> dict:
    """A scanned tree ('<stack>/layers/...') in the unrolled layout ('<stack>/layer_<i>/...'): stack_layers undone."""
    out = dict(params)
    for name in LAYER_STACKS:
        if SCANNED_LAYERS not in params.get(name, {}):
            continue
        stacked = params[name][SCANNED_LAYERS]
        rest = {k: v for k, v in params[name].items() if k != SCANNED_LAYERS}
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            rest[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        out[name] = rest
    return out


def unstacked_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """param_shapes of a scanned model as its unrolled twin's: '<stack>/layers/p' [L, ...] -> '<stack>/layer_<i>/p'."""
    out = {}
    for path, shape in shapes.items():
        stack, _, rest = path.partition(f"/{SCANNED_LAYERS}/")
        if stack in LAYER_STACKS and rest:
            out.update({f"{stack}/layer_{i}/{rest}": shape[1:] for i in range(shape[0])})
        else:
            out[path] = shape
    return out


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


def segment_states(hidden_BSD: Array, segments_BS: Array, count: int, how: str) -> Array:
    """[B, count, D]: the first ('first') or last ('last') token's state, or the mean state ('mean'), of each packed
    segment 1..count of every row; rows of absent segments hold no meaning."""
    member_BKS = segments_BS[:, None, :] == jnp.arange(1, count + 1)[None, :, None]
    if how == "mean":
        weights = member_BKS.astype(hidden_BSD.dtype)
        total = jnp.einsum("bks,bsd->bkd", weights, hidden_BSD, precision=jax.lax.Precision.HIGHEST)
        return total / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    if how == "first":
        index_BK = jnp.argmax(member_BKS, axis=-1)
    else:
        index_BK = segments_BS.shape[1] - 1 - jnp.argmax(member_BKS[..., ::-1], axis=-1)
    return jnp.take_along_axis(hidden_BSD, index_BK[..., None], axis=1)


def shift_right(targets_BT: Array, positions_BT: Array | None = None) -> Array:
    """Decoder inputs: targets moved one step right behind the start token (at every packed example's start)."""
    shifted = jnp.pad(targets_BT, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]
    if positions_BT is None:
        return shifted
    return jnp.where(positions_BT == 0, PAD_ID, shifted)


def default_positions(ids_BT: Array, offset: Array | int = 0) -> Array:
    """[B, T] positions offset, offset + 1, ... for unpacked rows."""
    return jnp.broadcast_to(jnp.arange(ids_BT.shape[1]) + offset, ids_BT.shape)


REMAT_POLICIES = {
    "full": None,  # keep only each block's input; recompute everything inside it in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul output, recompute the elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, not attention
}


class ScannedBlock(TransformerBlock):
    """TransformerBlock in nn.scan's form: the hidden states are the carry, and nothing is stacked as output."""

    def __call__(self, x: Array, *args) -> tuple[Array, None]:
        return super().__call__(x, *args), None


def remat_block(policy: str, block: type[nn.Module] = TransformerBlock, scanned: bool = False) -> type[nn.Module]:
    """A block class, rematerialised under a `model.remat` policy (the class itself for 'none')."""
    if policy == "none":
        return block
    # Arguments: self 0, x 1, self_mask 2, encoded 3, cross_mask 4, deterministic 5, decode 6, self_bias 7,
    # positions 8, causal 9. Inside a scan, XLA cannot merge the recomputation across iterations: no CSE guard.
    return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=(5, 6, 9), prevent_cse=not scanned)


def scanned_blocks(config: ModelConfig, num_layers: int, decode: bool) -> type[nn.Module]:
    """`num_layers` blocks as one nn.scan: parameters (and decoding caches) stacked on a leading 'layers' axis."""
    block = ScannedBlock if decode else remat_block(config.remat, ScannedBlock, scanned=True)
    return nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * 8, length=num_layers, metadata_params={nn.PARTITION_NAME: SCANNED_LAYERS})


class Stack(nn.Module):
    """N blocks over embedded tokens (and a final norm for pre-norm models): an encoder or a decoder."""

    config: ModelConfig
    num_layers: int
    causal: bool
    cross_attention: bool = False
    final_norm_multiplier: float = 1.0  # fixed factor on the final norm's output (see output_norm_multiplier)

    @nn.compact
    def __call__(self, x: Array, self_mask: Array | None, positions_BT: Array, encoded: Array | None = None,
                 cross_mask: Array | None = None, deterministic: bool = True, decode: bool = False,
                 cache_length: int = 0, mask_is_causal: bool = False) -> Array:
        """`mask_is_causal`: self_mask allows no key after its query (not so for a prefix LM's prompt)."""
        c = self.config
        bias = None
        if c.position == "relative":
            keys = positions_BT
            if decode:  # one query against every cache slot
                keys = jnp.broadcast_to(jnp.arange(cache_length), (positions_BT.shape[0], cache_length))
            bias = RelativePositionBias(c, bidirectional=not self.causal, name="relative_attention_bias")(
                positions_BT, keys)
        args = (self_mask, encoded, cross_mask, deterministic, decode, bias, positions_BT, mask_is_causal)
        if c.scan_layers:  # positional arguments: nn.remat marks deterministic, decode, causal static
            x, _ = scanned_blocks(c, self.num_layers, decode)(c, cross_attention=self.cross_attention,
                                                              name=SCANNED_LAYERS)(x, *args)
        else:
            block = TransformerBlock if decode else remat_block(c.remat)
            for i in range(self.num_layers):
                x = block(c, cross_attention=self.cross_attention, name=f"layer_{i}")(x, *args)
        if c.norm_position == "pre":
            x = Norm(c.norm, c.norm_epsilon, DTYPES[c.dtype], name="final_norm")(x)
            if self.final_norm_multiplier != 1.0:
                x = x * jnp.asarray(self.final_norm_multiplier, x.dtype)
        return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


def output_norm_multiplier(config: ModelConfig) -> float:
    """Fixed factor on the final norm before a tied, unscaled output projection (T5 v1.1, tied Llama): d_model**-0.5.

    Such a model multiplies its final states by the token table itself. transformers' T5 init (table std 1)
    then starts with logits of std sqrt(d_model) (a loss of 132 at d 256); shrinking the table instead starts
    tokens 16x below the sublayer outputs and, under Adam, moves it 16x faster than any projection. The final
    norm's effective gain is d_model**-0.5 instead, for unit-scale logits. Its stored gain starts at 1 and this
    factor stays outside it (folded in and out at Hugging Face import and export, like the query's score scale):
    stored at d_model**-0.5, Adam's fixed steps moved this output temperature 16x faster, relative to its size,
    than the quickstart's, and it grew 2.4x in 1,000 steps.
    """
    tied_unscaled = config.tie_output_embedding and not config.scale_tied_output and not config.embedding_norm
    return config.d_model ** -0.5 if tied_unscaled else 1.0


class Embedder(nn.Module):
    """Token embeddings plus absolute positions and token types where the config has them."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.dtype = DTYPES[c.dtype]
        # BERT's tied, unscaled MLM output reads its embeddings directly: small ones give unit-scale logits (its
        # embedding norm makes their scale irrelevant on the way in). Elsewhere tokens enter at unit scale.
        bert_like = c.tie_output_embedding and not c.scale_tied_output and c.embedding_norm
        self.tokens = Embed(c.vocab_size, c.d_model, self.dtype, stddev=c.d_model ** -0.5 if bert_like else 1.0,
                            name="token_embed")
        if c.position == "learned":
            self.learned = Embed(c.max_length, c.d_model, self.dtype, ("length_table", "embed"), 0.02,
                                 name="position_embed")
        if c.position == "sinusoidal":
            self.table = sinusoidal_positions(c.max_length, c.d_model)
        if c.type_vocab_size:
            self.types = Embed(c.type_vocab_size, c.d_model, self.dtype, ("types", "embed"), 0.02,
                               name="type_embed")
        if c.embedding_norm:
            self.norm = Norm(c.norm, c.norm_epsilon, self.dtype, name="embed_norm")

    def __call__(self, ids_BT: Array, positions_BT: Array, token_types_BT: Array | None = None) -> Array:
        c = self.config
        x = self.tokens(ids_BT)
        if c.position == "learned":
            x = x + self.learned(positions_BT)
        elif c.position == "sinusoidal":
            x = x + jnp.take(jnp.asarray(self.table), positions_BT, axis=0).astype(self.dtype)
        if c.type_vocab_size:
            x = x + self.types(jnp.zeros_like(ids_BT) if token_types_BT is None else token_types_BT)
        if c.embedding_norm:
            x = self.norm(x)
        return constrain(x, "batch", "length", "embed")

    def attend(self, y_BTD: Array) -> Array:
        """Logits through the tied token table."""
        if self.config.scale_tied_output:
            y_BTD = y_BTD * jnp.asarray(self.config.d_model**-0.5, self.dtype)
        return self.tokens.attend(y_BTD)


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al., 2021): `prompt_length` learned vectors prepended to the embedded input.

    The encoder (or a decoder-only stack, see Decoder) reads them with the tokens; its outputs at the prompt
    positions are dropped afterwards, so heads, cross-attention and decoding see one output per input token as
    without a prompt.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSD: Array, mask: Array, positions_BS: Array) -> tuple[Array, Array, Array]:
        c = self.config
        length, batch = c.prompt_length, x_BSD.shape[0]
        # Unit scale, as the embedded tokens beside it (BERT's are normalised to it).
        prompt = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                            (length, c.d_model), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x_BSD.dtype), (batch, length, c.d_model)), x_BSD], 1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (length,), bool), mask], -1)
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(length), (batch, length)), positions_BS + length], 1)
        return constrain(x, "batch", "length", "embed"), mask, positions


def _encode_tokens(config: ModelConfig, prompt: nn.Module | None, stack: nn.Module, x: Array, mask: Array,
                   positions: Array, deterministic: bool) -> Array:
    """The encoder stack over embedded tokens, behind the soft prompt when the config has one."""
    if prompt is None:
        return stack(x, mask, positions, deterministic=deterministic)
    x, mask, positions = prompt(x, mask, positions)
    return stack(x, mask, positions, deterministic=deterministic)[:, config.prompt_length:]


def _output_logits(config: ModelConfig, embedder: Embedder, output: nn.Module | None, y: Array) -> Array:
    logits = embedder.attend(y) if config.tie_output_embedding else output(y)
    return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)


def _untied_output(config: ModelConfig) -> Dense | None:
    if config.tie_output_embedding:
        return None
    return Dense((config.vocab_size,), 1, ("embed", "vocab"), DTYPES[config.dtype], name="output")


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence Transformer with shared token embeddings (Vaswani et al.; T5 by configuration)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedder = Embedder(c, name="embed")
        self.encoder = Stack(c, c.num_encoder_layers, causal=False, name="encoder")
        self.decoder = Stack(c, c.num_decoder_layers, causal=True, cross_attention=True,
                             final_norm_multiplier=output_norm_multiplier(c), name="decoder")
        self.output = _untied_output(c)
        self.dropout = nn.Dropout(c.dropout_rate)
        self.prompt = SoftPrompt(c, name="prompt") if c.prompt_length else None

    def encode(self, inputs_BS: Array, deterministic: bool = True, segments_BS: Array | None = None,
               positions_BS: Array | None = None) -> Array:
        """Encoder outputs [B, S, D]; with segment ids, packed examples do not see each other."""
        positions = default_positions(inputs_BS) if positions_BS is None else positions_BS
        mask = padding_mask(inputs_BS) if segments_BS is None else segment_mask(segments_BS, segments_BS)
        x = self.dropout(self.embedder(inputs_BS, positions), deterministic=deterministic)
        return _encode_tokens(self.config, self.prompt, self.encoder, x, mask, positions, deterministic)

    def decode(self, encoded: Array, inputs_BS: Array, decoder_inputs_BT: Array, deterministic: bool = True,
               decode: bool = False, position: Array | int = 0, input_segments_BS: Array | None = None,
               segments_BT: Array | None = None, positions_BT: Array | None = None, cache_length: int = 0,
               return_hidden: bool = False) -> Array:
        """Logits [B, T, V] for decoder inputs (or, with `return_hidden`, the final states [B, T, D] that
        `logits` projects); with `decode`, one cached step at `position`."""
        if segments_BT is None:
            self_mask = None if decode else causal_mask(decoder_inputs_BT.shape[1])
            cross_mask = padding_mask(inputs_BS)
        else:
            self_mask = causal_mask(decoder_inputs_BT.shape[1]) & segment_mask(segments_BT, segments_BT)
            cross_mask = segment_mask(segments_BT, input_segments_BS)
        positions = default_positions(decoder_inputs_BT, position) if positions_BT is None else positions_BT
        x = self.dropout(self.embedder(decoder_inputs_BT, positions), deterministic=deterministic)
        y = self.decoder(x, self_mask, positions, encoded, cross_mask, deterministic=deterministic, decode=decode,
                         cache_length=cache_length or decoder_inputs_BT.shape[1], mask_is_causal=True)
        return y if return_hidden else self.logits(y)

    def logits(self, hidden_BTD: Array) -> Array:
        """The output projection: final decoder states [..., D] -> float32 logits [..., V]."""
        return _output_logits(self.config, self.embedder, self.output, hidden_BTD)

    def __call__(self, inputs: Array, targets: Array, deterministic: bool = True,
                 inputs_segments: Array | None = None, inputs_positions: Array | None = None,
                 targets_segments: Array | None = None, targets_positions: Array | None = None,
                 return_hidden: bool = False) -> Array:
        """Teacher-forced logits [B, T, V] predicting `targets` [B, T] (final states [B, T, D] with
        `return_hidden`); segment/position arrays for packed rows."""
        encoded = self.encode(inputs, deterministic, inputs_segments, inputs_positions)
        return self.decode(encoded, inputs, shift_right(targets, targets_positions), deterministic,
                           input_segments_BS=inputs_segments, segments_BT=targets_segments,
                           positions_BT=targets_positions, return_hidden=return_hidden)


class Encoder(nn.Module):
    """Encoder-only Transformer (BERT by configuration).

    Returns hidden states [B, S, D], or with `config.head`: masked-LM logits [B, S, V], sequence-class
    logits [B, L] (from the pooled first token) or token-class logits [B, S, L].
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        dtype = DTYPES[c.dtype]
        self.embedder = Embedder(c, name="embed")
        self.encoder = Stack(c, c.num_encoder_layers, causal=False, name="encoder")
        self.dropout = nn.Dropout(c.dropout_rate)
        self.prompt = SoftPrompt(c, name="prompt") if c.prompt_length else None
        if c.pooler or c.head == "classification":
            self.pooler = Dense((c.d_model,), 1, ("embed", "mlp"), dtype, use_bias=True, name="pooler")
        if c.head == "mlm":
            self.mlm_transform = Dense((c.d_model,), 1, ("embed", "mlp"), dtype, use_bias=True, name="mlm_transform")
            self.mlm_norm = Norm(c.norm, c.norm_epsilon, dtype, name="mlm_norm")
            self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                       (c.vocab_size,), jnp.float32)
        if c.head in ("classification", "token_classification"):
            self.classifier = Dense((c.num_labels,), 1, ("embed", "labels"), dtype, use_bias=True, name="classifier")

    def logits(self, hidden_BKD: Array) -> Array:
        """The MLM head: dense, activation, norm, then the tied output projection plus a bias -> float32 logits
        (what `return_hidden` leaves out, as Decoder.logits, for chunked losses)."""
        c = self.config
        h = self.mlm_norm(ACTIVATIONS[c.activation](self.mlm_transform(hidden_BKD)))
        logits = self.embedder.tokens.attend(h) + self.mlm_bias.astype(h.dtype)
        return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)

    def pooled(self, hidden_BSD: Array, inputs_BS: Array, segments_BS: Array | None = None,
               max_segments: int = 0) -> Array:
        """tanh(dense(h)) of the first token's state (BERT) or, with `model.pooling=mean`, of the mean state over
        the non-pad tokens (an encoder trained without a [CLS] token, such as T5's); with `max_segments`, of each
        packed segment's: [B, max_segments, D]."""
        if max_segments:
            h = segment_states(hidden_BSD, segments_BS, max_segments, self.config.pooling)
        elif self.config.pooling == "mean":
            real = (inputs_BS != PAD_ID)[..., None].astype(hidden_BSD.dtype)
            h = jnp.sum(hidden_BSD * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)
        else:
            h = hidden_BSD[:, 0]
        return jnp.tanh(self.pooler(h))

    def __call__(self, inputs: Array, deterministic: bool = True, token_types: Array | None = None,
                 inputs_segments: Array | None = None, inputs_positions: Array | None = None,
                 predict_positions: Array | None = None, return_hidden: bool = False, max_segments: int = 0) -> Array:
        """`predict_positions` [B, K] (MLM head): logits [B, K, V] at these positions only; `return_hidden`
        (MLM head): the states [B, K or S, D] the head would read, for `logits` to project in chunks;
        `max_segments` (classification head, packed rows): logits [B, max_segments, L], one per segment."""
        c = self.config
        positions = default_positions(inputs) if inputs_positions is None else inputs_positions
        mask = padding_mask(inputs) if inputs_segments is None else segment_mask(inputs_segments, inputs_segments)
        x = self.dropout(self.embedder(inputs, positions, token_types), deterministic=deterministic)
        hidden = _encode_tokens(c, self.prompt, self.encoder, x, mask, positions, deterministic)
        if c.head == "mlm":
            if predict_positions is not None:
                hidden = jnp.take_along_axis(hidden, predict_positions[..., None], axis=1)
            return hidden if return_hidden else self.logits(hidden)
        if c.head == "classification":
            pooled = self.pooled(hidden, inputs, inputs_segments, max_segments)
            pooled = self.dropout(pooled, deterministic=deterministic)
            return self.classifier(pooled).astype(jnp.float32)
        if c.head == "token_classification":
            return self.classifier(self.dropout(hidden, deterministic=deterministic)).astype(jnp.float32)
        if c.pooler:  # keep the pooler's parameters in the tree (and in step with a BertModel checkpoint)
            _ = self.pooled(hidden, inputs)
        return hidden


class Decoder(nn.Module):
    """Decoder-only causal language model (Llama by configuration): logits [B, T, V]; with
    `model.head=classification`, sequence-class logits [B, L] from the last real token's final state (it is the
    one that attends to the whole text), and no vocabulary projection."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedder = Embedder(c, name="embed")
        self.decoder = Stack(c, c.num_decoder_layers, causal=True, final_norm_multiplier=output_norm_multiplier(c),
                             name="decoder")
        self.dropout = nn.Dropout(c.dropout_rate)
        self.prompt = SoftPrompt(c, name="prompt") if c.prompt_length else None
        if c.head == "classification":
            self.classifier = Dense((c.num_labels,), 1, ("embed", "labels"), DTYPES[c.dtype], use_bias=True,
                                    name="classifier")
        else:
            self.output = _untied_output(c)

    def __call__(self, inputs: Array, deterministic: bool = True, inputs_segments: Array | None = None,
                 inputs_positions: Array | None = None, decode: bool = False, position: Array | int = 0,
                 cache_length: int = 0, padding: Array | None = None, inputs_prefix: Array | None = None,
                 return_hidden: bool = False, max_segments: int = 0, write_soft_prompt: bool = False) -> Array:
        """Next-token logits (final states [B, T, D] with `return_hidden`); `padding` [B, T] (True at real
        tokens) masks left or right padding in the keys.

        `inputs_prefix` [B, T] (non-zero on each example's prefix) makes attention to prefix keys
        bidirectional: a prefix LM. `max_segments` (classification head, packed rows): class logits
        [B, max_segments, L] from each segment's last token.

        With `decode`, the T tokens fill the cache from slot `position` on (T > 1: a prompt's prefill), each
        attending to the slots up to its own, and `padding` and `inputs_prefix` cover the cache's slots
        [B, cache_length]; `inputs_positions` then gives the tokens' positions when they are not their slots.

        A soft prompt (model.prompt_length P) comes before the tokens: every token attends to all of it, it
        attends causally to itself only, and the outputs keep one row per token. With `decode` it holds P cache
        slots ahead of the tokens' (`position`, `cache_length`, `padding`, `inputs_prefix` count the tokens'
        slots); the allocation and the first prefill call pass `write_soft_prompt` to write it.
        """
        positions = default_positions(inputs, position) if inputs_positions is None else inputs_positions
        with_vectors = self.prompt is not None and (write_soft_prompt or not decode)
        mask = self.attention_mask(inputs, decode, position, cache_length, padding, inputs_prefix, inputs_segments,
                                   with_vectors)
        x = self.dropout(self.embedder(inputs, positions), deterministic=deterministic)
        length = cache_length or inputs.shape[1]
        if self.prompt is not None:
            x, mask, positions = self.behind_prompt(x, mask, positions, with_vectors)
            length += self.config.prompt_length
        y = self.decoder(x, mask, positions, deterministic=deterministic, decode=decode, cache_length=length,
                         mask_is_causal=inputs_prefix is None)
        if with_vectors:
            y = y[:, self.config.prompt_length:]
        if self.config.head == "classification":
            return self.classified(y, inputs, deterministic, inputs_segments, max_segments)
        return y if return_hidden else self.logits(y)

    @staticmethod
    def attention_mask(inputs: Array, decode: bool, position: Array | int, cache_length: int, padding: Array | None,
                       inputs_prefix: Array | None, inputs_segments: Array | None, needed: bool) -> Array | None:
        """Which token slots each token attends to ([B or 1, 1, T, T or cache_length]); None for a lone cached
        step that the cache's own written-slots mask covers (unless `needed`)."""
        if decode:
            if not (inputs.shape[1] > 1 or padding is not None or inputs_prefix is not None or needed):
                return None
            slots = jnp.arange(cache_length or inputs.shape[1])
            mask = (slots[None, :] <= (position + jnp.arange(inputs.shape[1]))[:, None])[None, None]
        else:
            mask = causal_mask(inputs.shape[1])
        if inputs_prefix is not None:
            mask = mask | (inputs_prefix != 0)[:, None, None, :]
        if inputs_segments is not None and not decode:
            return mask & segment_mask(inputs_segments, inputs_segments)
        return mask if padding is None else mask & padding[:, None, None, :]

    def behind_prompt(self, x_BTD: Array, mask: Array | None, positions_BT: Array,
                      with_vectors: bool) -> tuple[Array, Array | None, Array]:
        """Tokens moved behind the soft prompt's slots (positions + P, every prompt key visible); with
        `with_vectors`, the prompt's vectors put in front, each attending to the ones before it only."""
        length = self.config.prompt_length
        if not with_vectors:
            if mask is not None:
                mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (length,), bool), mask], -1)
            return x_BTD, mask, positions_BT + length
        x, mask, positions = self.prompt(x_BTD, mask, positions_BT)
        keys = mask.shape[-1]
        rows = jnp.arange(keys)[None, :] <= jnp.arange(length)[:, None]  # [P, P + S]: earlier prompt slots
        rows = jnp.broadcast_to(rows, mask.shape[:2] + rows.shape)
        return x, jnp.concatenate([rows, mask], 2), positions

    def classified(self, hidden_BTD: Array, inputs_BT: Array, deterministic: bool, segments_BT: Array | None = None,
                   max_segments: int = 0) -> Array:
        """Class logits [B, L] from each row's last non-PAD token (right-padded rows, as labeled batches are); with
        `max_segments`, [B, max_segments, L] from each packed segment's last token."""
        if max_segments:
            pooled = segment_states(hidden_BTD, segments_BT, max_segments, "last")
        else:
            last = jnp.maximum(jnp.sum(inputs_BT != PAD_ID, axis=1) - 1, 0)
            pooled = jnp.take_along_axis(hidden_BTD, last[:, None, None], axis=1)[:, 0]
        return self.classifier(self.dropout(pooled, deterministic=deterministic)).astype(jnp.float32)

    def logits(self, hidden_BTD: Array) -> Array:
        """The output projection: final states [..., D] -> float32 logits [..., V]."""
        return _output_logits(self.config, self.embedder, self.output, hidden_BTD)


FAMILIES = {"encoder_decoder": EncoderDecoder, "encoder": Encoder, "decoder": Decoder}


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config describes."""
    return FAMILIES[config.family](config)


def example_inputs(config: ModelConfig, batch: int = 1, length: int = 8) -> tuple[Array, ...]:
    """Positional arguments that initialize a model of this family."""
    ids = jnp.ones((batch, length), jnp.int32)
    return (ids, ids) if config.family == "encoder_decoder" else (ids,)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Slash-joined path -> shape of every parameter, without allocating any."""
    model = build_model(config)
    boxed = jax.eval_shape(lambda key: model.init(key, *example_inputs(config))["params"], jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(boxed,
                                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {"/".join(str(k.key) for k in path): tuple(getattr(leaf, "value", leaf).shape) for path, leaf in leaves}
