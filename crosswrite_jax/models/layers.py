"""Transformer building blocks shared by every model family, with logical axis names on all parameters.

Logical axes: parameters use vocab, embed, heads, kv_heads, kv, mlp, norm, relative_buckets;
activations use batch, length, embed, heads, kv, mlp, vocab.
Every block reads its switches from one ModelConfig, so BERT-, T5- and Llama-style models are
configurations of the same layers, not copies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from crosswrite_jax.config import ModelConfig

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1's "gelu_new"
    "silu": nn.silu,  # Llama's SwiGLU gate
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def constrain(x: Array, *axes: str | None) -> Array:
    """Pins an activation's sharding by logical axis names (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, axes)


def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BNTS: Array | None, bias_BNTS: Array | None = None,
              scale: float | None = None, kernel: str = "xla", causal: bool = False) -> Array:
    """Softmax(scale * q k + bias) v with K <= N key/value heads, through `jax.nn.dot_product_attention`.

    `kernel` 'cudnn' is cuDNN's fused flash attention (GPU); `causal` (the mask allows nothing above the
    diagonal) lets it skip those blocks instead of computing and masking them.
    """
    if kernel == "cudnn":
        if mask_BNTS is not None:  # cuDNN takes the mask as an additive bias, which must span [T, S]
            mask_BNTS = jnp.broadcast_to(mask_BNTS, mask_BNTS.shape[:2] + (q_BTNH.shape[1], k_BSKH.shape[1]))
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_BNTS, scale=scale,
                                            is_causal=causal, implementation="cudnn")
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_BNTS, scale=scale,
                                        implementation="xla")


def sinusoidal_positions(max_length: int, features: int) -> np.ndarray:
    """The fixed sin/cos position table of Vaswani et al. (2017), [max_length, features]."""
    position = np.arange(max_length)[:, None]
    rate = np.exp(-np.log(10000.0) * np.arange(0, features, 2) / features)
    table = np.zeros((max_length, features), np.float32)
    table[:, 0::2] = np.sin(position * rate)
    table[:, 1::2] = np.cos(position * rate)[:, : features // 2]
    return table


def rope_frequencies(config: ModelConfig, head_dim: int) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2], with Llama 3's scaling when model.rope_type is llama3."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # float32, as transformers
    inv_freq = np.float32(1.0) / np.float32(config.rope_theta) ** exponents
    if config.rope_type == "default":
        return inv_freq.astype(np.float32)
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_max_length
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary(x_BTNH: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
    """Rotary position embedding (Su et al., 2021) in the half-split layout Llama checkpoints use."""
    half = x_BTNH.shape[-1] // 2
    angles = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    first, second = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BTNH.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of key-minus-query distances: exact for small ones, logarithmic up to max_distance."""
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, distance, large)


class Embed(nn.Module):
    """An embedding table; `attend` reuses it as an output projection."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    axes: tuple[str, str] = ("vocab", "embed")
    stddev: float = 1.0

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.axes),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids_BT: Array) -> Array:
        return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: Array) -> Array:
        return flat_matmul(x_BTD, self.embedding.astype(self.dtype).T, 1)


def Norm(kind: str = "layernorm", epsilon: float = 1e-6, dtype: jnp.dtype = jnp.float32, name: str | None = None):
    """LayerNorm or RMSNorm over the embedding axis, its gain initialised to 1; its small vectors are replicated
    (logical axis 'norm')."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, name=name)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, bias_init=bias_init,
                        use_fast_variance=False, name=name)


@dataclass(frozen=True)
class Lora:
    """Low-rank adapters (Hu et al., 2021): y = W x + (alpha / rank) B A x on Dense layers whose path matches."""

    rank: int
    alpha: float
    dropout: float
    targets: str  # regex, fully matched against the slash-joined module path

    def applies_to(self, path: tuple[str, ...]) -> bool:
        return self.rank > 0 and re.fullmatch(self.targets, "/".join(path)) is not None


def lora_of(config: ModelConfig) -> Lora | None:
    """The adapters a config asks for, or None."""
    if config.lora_rank <= 0:
        return None
    return Lora(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)


def flat_matmul(x: Array, kernel: Array, num_in_axes: int) -> Array:
    """x [..., in...] times kernel [in..., out...] -> [..., out...], as one 2-D matmul.

    The same product as a dot_general over the trailing axes, but XLA:CPU lays out the gradient of a
    [batch, length, ...] dot_general for its weight-gradient matmul with a strided transposing copy (1.8x an MLP's
    step at [64, 48, 1024]); merging the leading and the contracted axes first avoids it (docs/PERFORMANCE.md).
    """
    lead, inner, out = x.shape[:x.ndim - num_in_axes], x.shape[x.ndim - num_in_axes:], kernel.shape[num_in_axes:]
    y = jnp.dot(x.reshape(math.prod(lead), math.prod(inner)), kernel.reshape(math.prod(inner), math.prod(out)))
    return y.reshape(lead + out)


class Dense(nn.Module):
    """A linear map contracting the last `num_in_axes` axes into `features`, with an optional bias.

    The kernel is created at its full rank so logical axis names apply to each of its axes. With `lora`, a
    matching layer also holds `lora_a` [in..., r] (random) and `lora_b` [r, out...] (zeros, so training starts
    from the base model's outputs); adapter dropout is active when a 'dropout' rng is given (training).
    """

    features: tuple[int, ...]
    num_in_axes: int
    kernel_axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False
    lora: Lora | None = None
    init_scale: float = 1.0  # variance of the kernel's init relative to 1 / fan_in

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = self.num_in_axes, len(self.features)
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal",
                                                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            x.shape[-n_in:] + tuple(self.features), jnp.float32)
        y = flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:]),
                              tuple(self.features), jnp.float32)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and self.lora.applies_to(self.scope.path):
            y = y + self._adapter(x)
        return y

    def _adapter(self, x: Array) -> Array:
        n_in, r = self.num_in_axes, self.lora.rank
        init_a = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                                  out_axis=n_in)
        a = self.param("lora_a", nn.with_logical_partitioning(init_a, self.kernel_axes[:n_in] + (None,)),
                       x.shape[-n_in:] + (r,), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.kernel_axes[n_in:]),
                       (r,) + tuple(self.features), jnp.float32)
        if self.lora.dropout > 0 and self.has_rng("dropout"):
            x = nn.Dropout(self.lora.dropout)(x, deterministic=False)
        low = flat_matmul(x.astype(self.dtype), a.astype(self.dtype), n_in)
        up = flat_matmul(low, b.astype(self.dtype), 1)
        return up * jnp.asarray(self.lora.alpha / r, self.dtype)


def merged_kernel(kernel: Array, lora_a: Array, lora_b: Array, alpha: float) -> Array:
    """The kernel with its adapter folded in: W + (alpha / r) A B, in W's layout; stacked layers (model.scan_layers)
    layer by layer."""
    if lora_a.ndim + lora_b.ndim - 2 > kernel.ndim:  # a leading layer axis on all three
        return jax.vmap(merged_kernel, (0, 0, 0, None))(kernel, lora_a, lora_b, alpha)
    rank = lora_a.shape[-1]
    return kernel + (alpha / rank) * jnp.tensordot(lora_a, lora_b, axes=1)


def _dense(features, axis, kernel_axes, dtype, name, use_bias=False, lora=None, init_scale=1.0):
    features = features if isinstance(features, tuple) else (features,)
    num_in_axes = len(axis) if isinstance(axis, tuple) else 1
    return Dense(features, num_in_axes, kernel_axes, dtype, use_bias, lora, init_scale, name=name)


def head_dim(config: ModelConfig) -> int:
    return config.head_dim or config.d_model // config.num_heads


class MultiHeadAttention(nn.Module):
    """Multi-head (or grouped-query) attention with rotary positions and a key/value cache for decoding."""

    config: ModelConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x_q: Array, x_kv: Array, mask: Array | None, bias: Array | None = None,
                 positions: Array | None = None, decode: bool = False, causal: bool = False) -> Array:
        """`causal`: the mask allows no key after its query (a fused kernel may skip those blocks)."""
        c = self.config
        dtype, n, h = DTYPES[c.dtype], c.num_heads, head_dim(c)
        kv_heads = c.num_kv_heads or n
        lora = lora_of(c)
        project = lambda heads, axes, name, init_scale=1.0: _dense(  # noqa: E731
            (heads, h), -1, ("embed", axes, "kv"), dtype, name, c.use_bias, lora, init_scale)
        # Without the 1/sqrt(head_dim) score scale (T5), the query's init carries it, as in T5's own init:
        # otherwise the initial scores have standard deviation sqrt(head_dim) and the softmax saturates.
        q = project(n, "heads", "query", 1.0 if c.scale_attention else 1.0 / h)(x_q)
        if decode and self.cross:
            k, v = self._cross_cache(x_kv, project, kv_heads)
        else:
            k = project(kv_heads, "kv_heads", "key")(x_kv)
            v = project(kv_heads, "kv_heads", "value")(x_kv)
            if c.position == "rope" and not self.cross:
                inv_freq = rope_frequencies(c, h)
                q, k = rotary(q, positions, inv_freq), rotary(k, positions, inv_freq)
            if decode:
                k, v, mask = self._self_cache(k, v, mask)
        q = constrain(q, "batch", "length", "heads", "kv")
        kernel = "xla" if decode else c.attention_kernel  # decoding attends from a few queries to the cache
        out = attention(q, k, v, mask, bias, None if c.scale_attention else 1.0, kernel, causal)
        return _dense(x_q.shape[-1], (-2, -1), ("heads", "kv", "embed"), dtype, "out", c.use_bias, lora)(out)

    def _self_cache(self, k, v, mask):
        """Writes this step's key/value at the cache index; masks positions not yet written."""
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # allocation call: shapes are [B, max_length, K, H]
            return k, v, mask
        i = index.value
        if i.ndim == 1:  # one index per row (decoding slots, crosswrite_jax.slots): one position each, in place
            rows = jnp.arange(k.shape[0])
            cached_k.value = cached_k.value.at[rows, i].set(k[:, 0], mode="drop")
            cached_v.value = cached_v.value.at[rows, i].set(v[:, 0], mode="drop")
            index.value = i + 1
            written = (jnp.arange(cached_k.value.shape[1])[None, :] < index.value[:, None])[:, None, None, :]
            return cached_k.value, cached_v.value, written if mask is None else written & mask
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        index.value = i + k.shape[1]
        written = (jnp.arange(cached_k.value.shape[1]) < index.value)[None, None, None, :]
        return cached_k.value, cached_v.value, written if mask is None else written & mask

    def _cross_cache(self, x_kv, project, kv_heads):
        """Projects encoder outputs to keys/values once, on the allocation call, and reuses them."""
        if self.has_variable("cache", "cross_key"):
            return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        k = project(kv_heads, "kv_heads", "key")(x_kv)
        v = project(kv_heads, "kv_heads", "value")(x_kv)
        self.put_variable("cache", "cross_key", k)
        self.put_variable("cache", "cross_value", v)
        return k, v


class Mlp(nn.Module):
    """Position-wise feed-forward block; gated (GLU: act(wi_0 x) * wi_1 x) when the config says so."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        c = self.config
        dtype, act, lora = DTYPES[c.dtype], ACTIVATIONS[c.activation], lora_of(c)
        if c.gated_mlp:
            hidden = act(_dense(c.d_ff, -1, ("embed", "mlp"), dtype, "wi_0", c.use_bias, lora)(x))
            hidden = hidden * _dense(c.d_ff, -1, ("embed", "mlp"), dtype, "wi_1", c.use_bias, lora)(x)
        else:
            hidden = act(_dense(c.d_ff, -1, ("embed", "mlp"), dtype, "wi", c.use_bias, lora)(x))
        hidden = constrain(hidden, "batch", "length", "mlp")
        hidden = nn.Dropout(c.dropout_rate)(hidden, deterministic=deterministic)
        return _dense(x.shape[-1], -1, ("mlp", "embed"), dtype, "wo", c.use_bias, lora)(hidden)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention and MLP, each with a residual; pre- or post-norm."""

    config: ModelConfig
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x: Array, self_mask: Array | None, encoded: Array | None = None,
                 cross_mask: Array | None = None, deterministic: bool = True, decode: bool = False,
                 self_bias: Array | None = None, positions: Array | None = None, causal: bool = False) -> Array:
        """`causal`: self_mask allows no key after its query."""
        c = self.config
        dtype = DTYPES[c.dtype]
        norm = lambda name: Norm(c.norm, c.norm_epsilon, dtype, name=name)  # noqa: E731
        drop = lambda y: nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
        post = c.norm_position == "post"

        def sublayer(x, name, run):
            if post:
                return constrain(norm(f"{name}_norm")(x + drop(run(x))), "batch", "length", "embed")
            return constrain(x + drop(run(norm(f"{name}_norm")(x))), "batch", "length", "embed")

        x = sublayer(x, "self_attention", lambda h: MultiHeadAttention(c, name="self_attention")(
            h, h, self_mask, self_bias, positions, decode, causal))
        if self.cross_attention:
            x = sublayer(x, "cross_attention", lambda h: MultiHeadAttention(c, cross=True, name="cross_attention")(
                h, encoded, cross_mask, None, None, decode))
        return sublayer(x, "mlp", lambda h: Mlp(c, name="mlp")(h, deterministic))


def relative_bias_multiplier(config: ModelConfig) -> float:
    """Fixed factor on T5's stored relative-bias table: d_model**0.5.

    The bias adds straight to the attention scores, while a score from the query and key projections sums d_head
    products of d_model-wide inputs, so under Adam's fixed step sizes the scores move with every projection step
    far faster than any bias entry can. Stored as is (transformers' layout), each entry moves at most the learning
    rate a step: at 2e-3 over the quickstart's 1,000 cosine steps about 1 nat in all, too little for the
    position preferences (local, monotone) translation needs, and T5 trailed the quickstart's sinusoids by 3.6
    BLEU. The table is stored divided by this factor (folded in and out at Hugging Face import and export), so
    the bias starts where transformers' does and moves d_model**0.5 times faster.
    """
    return float(config.d_model) ** 0.5


class RelativePositionBias(nn.Module):
    """T5's learned per-head bias over bucketed relative distances, [B, N, T, S]."""

    config: ModelConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions_BT: Array, key_positions_BS: Array) -> Array:
        c = self.config
        multiplier = relative_bias_multiplier(c)
        # The bias starts at transformers' T5 init (std d_model**-0.5); the stored table is that over the multiplier.
        table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(c.d_model ** -0.5 / multiplier), ("relative_buckets", "heads")),
            (c.relative_buckets, c.num_heads), jnp.float32) * multiplier
        relative = key_positions_BS[:, None, :] - query_positions_BT[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(relative, self.bidirectional, c.relative_buckets, c.relative_max_distance)
        return jnp.take(table, buckets, axis=0).transpose(0, 3, 1, 2).astype(DTYPES[c.dtype])
