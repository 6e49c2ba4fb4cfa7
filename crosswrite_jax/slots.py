"""Decoding slots: iteration-level (continuous) batching of greedy encoder-decoder decoding.

A fixed number of rows decode together, one token per step. A text takes a free row between steps (its source
is encoded and its cross-attention keys/values are written into that row) and gives the row back when its
output ends, so a long output no longer holds rows that shorter ones have finished with, as it does when a
batch decodes until its longest output ends. Every row keeps its own position and cache index
(`MultiHeadAttention._self_cache` writes one position per row when the index is a vector), so each text's
output is `greedy_decode`'s for that text.

`SlotDecoder` holds the device state and the three jitted functions; the serving loop (`serve.SlotBatcher`)
decides who joins and when.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crosswrite_jax.decode import _name, _rows_axis, encoder_decoder_start
from crosswrite_jax.models.layers import DTYPES
from crosswrite_jax.models.transformer import PAD_ID, EncoderDecoder

Array = jax.Array


class SlotState(NamedTuple):
    """The device state of `rows` decoding slots (W: input width, L: longest output)."""

    cache: Any  # the decoder's cache, rows first; cache_index is one entry per row
    encoded: Array  # [rows, 1, D] zeros for the decoder's signature: cross-attention reads its cached keys/values
    inputs: Array  # [rows, W] source ids, PAD after each (their padding masks cross-attention)
    last: Array  # [rows] the token each row feeds next (the start token after joining)
    position: Array  # [rows] tokens each row has generated (the position it feeds next)
    out: Array  # [rows, L] generated tokens, PAD after the end
    running: Array  # [rows] still generating


def _per_row_index(cache: Any, position_N: Array) -> Any:
    """The cache with every cache_index set to each row's position (one entry per row, per layer if scanned)."""
    def put(path: tuple, x: Array) -> Array:
        if _name(path) != "cache_index":
            return x
        shape = (x.shape[0], position_N.shape[0]) if _rows_axis(path) else position_N.shape
        return jnp.broadcast_to(position_N, shape).astype(jnp.int32)

    return jax.tree_util.tree_map_with_path(put, cache)


def _set_rows(cache: Any, fresh: Any, slots_A: Array) -> Any:
    """`cache` with the cross-attention entries of rows `slots_A` taken from `fresh` (A rows, sources of any
    width up to the cache's, zeros after; index == rows: dropped). The self-attention entries stay, masked until
    rewritten: every step sets the cache index from the rows' positions."""
    def put(path: tuple, x: Array, new: Array) -> Array:
        if not _name(path).startswith("cross_"):
            return x
        axis = _rows_axis(path)
        widen = [(0, 0)] * new.ndim
        widen[axis + 1] = (0, x.shape[axis + 1] - new.shape[axis + 1])
        where = (slice(None),) * axis + (slots_A,)
        return x.at[where].set(jnp.pad(new, widen).astype(x.dtype), mode="drop")

    return jax.tree_util.tree_map_with_path(put, cache, fresh)


class SlotDecoder:
    """Greedy decoding in `rows` slots that texts join and leave between steps.

    `start()` builds the empty state. `join(state, inputs, slots)` encodes sources [A, w] (any w up to `width`,
    each compiled once) into the given slots (slot index `rows` marks a filler row). `advance(state, steps)`
    decodes every running row until one of them ends, or `steps` steps, and says how many it took.
    `outputs(state)` reads (running, out) back to the host.
    """

    def __init__(self, model: EncoderDecoder, params: Any, rows: int, width: int, max_new: int, eos_id: int):
        self.model, self.params = model, params
        self.rows, self.width, self.max_new, self.eos_id = rows, width, max_new, eos_id
        self._start = jax.jit(self._empty)
        self._join = jax.jit(self._join_rows, donate_argnums=(1,))
        self._advance = jax.jit(self._advance_rows, donate_argnums=(1,))

    # --------------------------------------------------------------------------------------- traced functions

    def _empty(self, params: Any) -> SlotState:
        rows, length = self.rows, self.max_new
        inputs = jnp.full((rows, self.width), PAD_ID, jnp.int32).at[:, 0].set(self.eos_id)  # a harmless source
        _, cache, _, _, _ = encoder_decoder_start(self.model, params, inputs, length)  # cache rows of `length`
        zeros = jnp.zeros((rows,), jnp.int32)
        placeholder = jnp.zeros((rows, 1, self.model.config.d_model), DTYPES[self.model.config.dtype])
        return SlotState(_per_row_index(cache, zeros), placeholder, inputs, jnp.full((rows,), PAD_ID, jnp.int32),
                         zeros, jnp.full((rows, length), PAD_ID, jnp.int32), jnp.zeros((rows,), bool))

    def _join_rows(self, params: Any, state: SlotState, inputs_Aw: Array, slots_A: Array) -> SlotState:
        # The sources' cross-attention keys / values, at their own width w <= W (a one-position cache).
        _, fresh, _, _, _ = encoder_decoder_start(self.model, params, inputs_Aw, 1)
        put = lambda x, new: x.at[slots_A].set(new.astype(x.dtype), mode="drop")  # noqa: E731
        inputs = jnp.pad(inputs_Aw, ((0, 0), (0, self.width - inputs_Aw.shape[1])), constant_values=PAD_ID)
        return SlotState(_set_rows(state.cache, fresh, slots_A), state.encoded,
                         put(state.inputs, inputs), put(state.last, jnp.full(slots_A.shape, PAD_ID)),
                         put(state.position, jnp.zeros(slots_A.shape, jnp.int32)),
                         put(state.out, jnp.full((slots_A.shape[0], self.max_new), PAD_ID)),
                         put(state.running, jnp.ones(slots_A.shape, bool)))

    def _advance_rows(self, params: Any, state: SlotState, steps: Array) -> tuple[SlotState, Array]:
        model, length, eos = self.model, self.max_new, self.eos_id
        rows = jnp.arange(self.rows)
        started = state.running

        def body(carry):
            n, s = carry
            fed = jnp.minimum(s.position, length - 1)  # rows that have ended feed a position in range
            logits, updated = model.apply({"params": params, "cache": _per_row_index(s.cache, s.position)},
                                          s.encoded, s.inputs, s.last[:, None], decode=True, position=fed[:, None],
                                          cache_length=length, mutable=["cache"], method=model.decode)
            chosen = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            out = s.out.at[rows, s.position].set(jnp.where(s.running, chosen, PAD_ID), mode="drop")
            ends = s.running & ((chosen == eos) | (s.position + 1 >= length))
            return n + 1, SlotState(updated["cache"], s.encoded, s.inputs, jnp.where(s.running, chosen, s.last),
                                    jnp.where(s.running, s.position + 1, s.position), out, s.running & ~ends)

        def keep_going(carry):
            n, s = carry
            return (n < steps) & jnp.any(s.running) & ~jnp.any(started & ~s.running)

        taken, state = jax.lax.while_loop(keep_going, body, (jnp.zeros((), jnp.int32), state))
        return state, taken

    # --------------------------------------------------------------------------------------- host calls

    def start(self) -> SlotState:
        return self._start(self.params)

    def join(self, state: SlotState, inputs_Aw: np.ndarray, slots_A: np.ndarray) -> SlotState:
        return self._join(self.params, state, jnp.asarray(inputs_Aw, jnp.int32), jnp.asarray(slots_A, jnp.int32))

    def advance(self, state: SlotState, steps: int) -> tuple[SlotState, Array]:
        """(the state after decoding until a running row ends or `steps` steps, the steps taken)."""
        return self._advance(self.params, state, jnp.asarray(steps, jnp.int32))

    @staticmethod
    def outputs(state: SlotState) -> tuple[np.ndarray, np.ndarray]:
        """(running [rows], out [rows, L]) on the host."""
        running, out = jax.device_get((state.running, state.out))
        return np.asarray(running), np.asarray(out)
