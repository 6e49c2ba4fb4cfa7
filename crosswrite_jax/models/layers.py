"""Transformer building blocks shared by every model family, with logical axis names on all parameters.

Logical axes: parameters use vocab, embed, heads, kv, mlp, norm; activations use batch, length, embed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": nn.relu, "gelu": nn.gelu}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

def constrain(x: Array, *axes: str | None) -> Array:
    """Pins an activation's sharding by logical axis names (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, axes)


def attention(q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, mask_BNTS: Array | None) -> Array:
    """Softmax(q k / sqrt(H)) v; `jax.nn.dot_product_attention` picks fused kernels where they exist."""
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_BNTS)


def sinusoidal_positions(max_length: int, features: int) -> np.ndarray:
    """The fixed sin/cos position table of Vaswani et al. (2017), [max_length, features]."""
    position = np.arange(max_length)[:, None]
    rate = np.exp(-np.log(10000.0) * np.arange(0, features, 2) / features)
    table = np.zeros((max_length, features), np.float32)
    table[:, 0::2] = np.sin(position * rate)
    table[:, 1::2] = np.cos(position * rate)[:, : features // 2]
    return table


class Embed(nn.Module):
    """Token embedding table; `attend` reuses it as the output projection."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids_BT: Array) -> Array:
        return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: Array) -> Array:
        return jnp.einsum("btd,vd->btv", x_BTD, self.embedding.astype(self.dtype))


def Norm(kind: str = "layernorm", epsilon: float = 1e-6, dtype: jnp.dtype = jnp.float32, name: str | None = None):
    """LayerNorm or RMSNorm over the embedding axis; its small vectors are replicated (logical axis 'norm')."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, name=name)
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, bias_init=bias_init, name=name)


class Dense(nn.Module):
    """A linear map contracting the last `len(in_axes)` axes into `features`; no bias.

    The kernel is created at its full rank so logical axis names apply to each of its axes.
    """

    features: tuple[int, ...]
    num_in_axes: int
    kernel_axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = self.num_in_axes, len(self.features)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                            x.shape[-n_in:] + tuple(self.features), jnp.float32)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


def _dense(features, axis, kernel_axes, dtype, name):
    features = features if isinstance(features, tuple) else (features,)
    num_in_axes = len(axis) if isinstance(axis, tuple) else 1
    return Dense(features, num_in_axes, kernel_axes, dtype, name=name)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an optional key/value cache for incremental decoding."""

    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q: Array, x_kv: Array, mask: Array | None, decode: bool = False,
                 cache_kind: str = "self") -> Array:
        n, h, d = self.num_heads, self.head_dim, x_q.shape[-1]
        q = _dense((n, h), -1, ("embed", "heads", "kv"), self.dtype, "query")(x_q)
        if decode and cache_kind == "cross":
            k, v = self._cross_cache(x_kv)
        else:
            k = _dense((n, h), -1, ("embed", "heads", "kv"), self.dtype, "key")(x_kv)
            v = _dense((n, h), -1, ("embed", "heads", "kv"), self.dtype, "value")(x_kv)
            if decode:
                k, v, mask = self._self_cache(k, v, mask)
        q = constrain(q, "batch", "length", "heads", "kv")
        out = attention(q, k, v, mask)
        return _dense(d, (-2, -1), ("heads", "kv", "embed"), self.dtype, "out")(out)

    def _self_cache(self, k, v, mask):
        """Writes this step's key/value at the cache index; masks positions not yet written."""
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # allocation call: shapes are [B, max_length, N, H]
            return k, v, mask
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        index.value = i + k.shape[1]
        written = (jnp.arange(cached_k.value.shape[1]) < index.value)[None, None, None, :]
        return cached_k.value, cached_v.value, written

    def _cross_cache(self, x_kv):
        """Projects encoder outputs to keys/values once, on the allocation call, and reuses them."""
        n, h = self.num_heads, self.head_dim
        if self.has_variable("cache", "cross_key"):
            return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        k = _dense((n, h), -1, ("embed", "heads", "kv"), self.dtype, "key")(x_kv)
        v = _dense((n, h), -1, ("embed", "heads", "kv"), self.dtype, "value")(x_kv)
        self.put_variable("cache", "cross_key", k)
        self.put_variable("cache", "cross_value", v)
        return k, v


class Mlp(nn.Module):
    """Position-wise feed-forward block."""

    d_ff: int
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        hidden = _dense(self.d_ff, -1, ("embed", "mlp"), self.dtype, "wi")(x)
        hidden = ACTIVATIONS[self.activation](hidden)
        hidden = constrain(hidden, "batch", "length", "mlp")
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return _dense(x.shape[-1], -1, ("mlp", "embed"), self.dtype, "wo")(hidden)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, MLP; each with a residual."""

    num_heads: int
    head_dim: int
    d_ff: int
    activation: str
    norm: str
    norm_epsilon: float
    dropout_rate: float
    cross_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, self_mask: Array | None, encoded: Array | None = None,
                 cross_mask: Array | None = None, deterministic: bool = True, decode: bool = False) -> Array:
        norm = lambda name: Norm(self.norm, self.norm_epsilon, self.dtype, name=name)  # noqa: E731
        drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
        h = norm("self_attention_norm")(x)
        h = MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, name="self_attention")(
            h, h, self_mask, decode=decode, cache_kind="self")
        x = constrain(x + drop(h), "batch", "length", "embed")
        if self.cross_attention:
            h = norm("cross_attention_norm")(x)
            h = MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, name="cross_attention")(
                h, encoded, cross_mask, decode=decode, cache_kind="cross")
            x = constrain(x + drop(h), "batch", "length", "embed")
        h = norm("mlp_norm")(x)
        h = Mlp(self.d_ff, self.activation, self.dropout_rate, self.dtype, name="mlp")(h, deterministic)
        return constrain(x + drop(h), "batch", "length", "embed")
