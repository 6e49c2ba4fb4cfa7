"""Decoding with a key/value cache: greedy, sampling and beam search, for encoder-decoder and decoder-only models.

The searches are model-agnostic: they drive a *step function* `(tokens [N], position, cache) -> (logits [N, V],
cache)` over a token buffer that starts with each row's prompt, from position `first` on. Prompt tokens before a
row's last are forced; after it the search chooses. An encoder-decoder's prompt is the start token. A
decoder-only LM's prompts are moved to the right end of the buffer and prefilled into the cache in one pass
(causally, or bidirectionally for a prefix LM as it was trained); the search then starts at the last prompt
token. Every loop is a `jax.lax.while_loop` over fixed shapes: it compiles once and stops early when every row
is done.

Beam scores are `sum of log-probs / length ** length_penalty`, where length counts the generated tokens,
EOS included (HF's convention; T5X uses ((5 + length) / 6) ** alpha instead).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from crosswrite_jax.config import PREFIX_LM_PREFILL_CHUNK, SCANNED_LAYERS, DecodeConfig
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import PAD_ID, Decoder, EncoderDecoder

Array = jax.Array
StepFn = Callable[[Array, Array, Any], tuple[Array, Any]]  # (tokens [N], position, cache) -> (logits [N, V], cache)
ChooseFn = Callable[[Array, Array], Array]  # (logits [N, V], position) -> tokens [N]
NEG_INF = -jnp.inf

# ------------------------------------------------------------------------------------------- token choice


def argmax_choice(logits_NV: Array, position: Array) -> Array:
    """The most likely token of each row."""
    del position
    return jnp.argmax(logits_NV, axis=-1).astype(jnp.int32)


def filter_logits(logits_NV: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Logits divided by the temperature, -inf outside the top-k tokens and outside the nucleus of mass top_p."""
    logits = logits_NV.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the most likely token always stays
        threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def sampling_choice(rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> ChooseFn:
    """A choice that samples each row from its filtered distribution, with a key folded per position."""

    def choose(logits_NV: Array, position: Array) -> Array:
        filtered = filter_logits(logits_NV, temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, position), filtered, axis=-1).astype(jnp.int32)

    return choose


# ------------------------------------------------------------------------------------------- cache rows


def _rows_axis(path: tuple) -> int:
    """The axis of a cache entry's rows: 1 under model.scan_layers' stacked layers (axis 0 is the layer), else 0."""
    return int(any(getattr(key, "key", None) == SCANNED_LAYERS for key in path))


def _is_rows(leaf: Array, rows: int, axis: int = 0) -> bool:
    return leaf.ndim > axis and leaf.shape[axis] == rows


def _name(path: tuple) -> str:
    return str(getattr(path[-1], "key", path[-1])) if path else ""


def gather_rows(cache: Any, index_N: Array) -> Any:
    """Cache rows picked by index along axis 0 (for beams: each new beam takes its origin's rows).

    Scalar entries (cache_index) stay as they are, and so do `cross_*` entries: every beam of a row holds the
    same encoder keys/values, and beams never move between rows.
    """
    rows = index_N.shape[0]

    def pick(path: tuple, x: Array) -> Array:
        axis = _rows_axis(path)
        if not _is_rows(x, rows, axis) or _name(path).startswith("cross_"):
            return x
        return jnp.take(x, index_N, axis=axis)

    return jax.tree_util.tree_map_with_path(pick, cache)


def repeat_rows(cache: Any, rows: int, times: int) -> Any:
    """Every batch row repeated `times` times in a row (for beams); scalar entries stay as they are."""
    def repeat(path: tuple, x: Array) -> Array:
        axis = _rows_axis(path)
        return jnp.repeat(x, times, axis=axis) if _is_rows(x, rows, axis) else x

    return jax.tree_util.tree_map_with_path(repeat, cache)


# ------------------------------------------------------------------------------------------- searches


def search(step: StepFn, cache: Any, prompt_NP: Array, lengths_N: Array, max_new: int, eos_id: int,
           choose: ChooseFn = argmax_choice, first: int = 0) -> Array:
    """Greedy or sampled continuations [N, max_new] of the prompts (row n's are its first lengths_N[n] tokens);
    PAD after each row's EOS. The loop starts by feeding position `first` (the cache holds the ones before)."""
    rows, width = prompt_NP.shape
    total = width + max_new
    tokens = jnp.full((rows, total), PAD_ID, jnp.int32).at[:, :width].set(prompt_NP.astype(jnp.int32))

    def body(carry):
        i, tokens, cache, done = carry
        logits, cache = step(jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False), i, cache)
        chosen = choose(logits, i)
        forced = i + 1 < lengths_N
        given = jax.lax.dynamic_index_in_dim(tokens, i + 1, axis=1, keepdims=False)
        token = jnp.where(forced, given, jnp.where(done, PAD_ID, chosen))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i + 1, axis=1)
        finished = ~forced & ((chosen == eos_id) | (i + 2 - lengths_N >= max_new))
        return i + 1, tokens, cache, done | finished

    def keep_going(carry):
        i, _, _, done = carry
        return (i < total - 1) & ~jnp.all(done)

    init = (jnp.asarray(first, jnp.int32), tokens, cache, jnp.zeros((rows,), bool))
    _, tokens, _, _ = jax.lax.while_loop(keep_going, body, init)
    return _continuations(tokens, lengths_N, max_new)


def _continuations(tokens_NS: Array, lengths_N: Array, max_new: int) -> Array:
    """The max_new tokens after each row's prompt."""
    index = lengths_N[:, None] + jnp.arange(max_new)[None, :]
    return jnp.take_along_axis(tokens_NS, index, axis=1)


def _score(logprob: Array, length: Array, length_penalty: float) -> Array:
    return logprob / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty


def beam_search(step: StepFn, cache: Any, prompt_BP: Array, lengths_B: Array, max_new: int, eos_id: int,
                beam_size: int, length_penalty: float = 1.0, first: int = 0) -> tuple[Array, Array]:
    """Best continuations [B, max_new] and their scores [B]; `cache` holds B * beam_size rows (row b's beams
    at b * beam_size ...) and the positions before `first`.

    Each step extends the live beams by their 2K best tokens (K = beam_size). A candidate ending in EOS (or
    reaching max_new tokens) is finished if it ranks among the K best, and the K best finished hypotheses are
    kept; the K best others stay live. A row is done when no live beam can beat its worst finished hypothesis
    (an exact bound: log-probs only fall, so the best live log-prob at the most favorable length). With
    beam_size 1 and length_penalty 0 this is greedy search.
    """
    batch, width = prompt_BP.shape
    k, total = beam_size, width + max_new
    tokens = jnp.full((batch, k, total), PAD_ID, jnp.int32).at[:, :, :width].set(prompt_BP[:, None].astype(jnp.int32))
    live_logprob = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
    finished_scores = jnp.full((batch, k), NEG_INF, jnp.float32)
    base = (jnp.arange(batch) * k)[:, None]

    def body(carry):
        i, tokens, live_logprob, cache, finished_tokens, finished_scores = carry
        logits, cache = step(tokens[:, :, i].reshape(batch * k), i, cache)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, -1)
        vocab = logprobs.shape[-1]
        forced = (i + 1 < lengths_B)[:, None]  # [B, 1]
        given = jax.lax.dynamic_index_in_dim(tokens, i + 1, axis=2, keepdims=False)  # [B, K]
        forced_logprobs = jnp.where(jnp.arange(vocab) == given[..., None], 0.0, NEG_INF)
        logprobs = jnp.where(forced[..., None], forced_logprobs, logprobs)
        candidates = (live_logprob[..., None] + logprobs).reshape(batch, k * vocab)
        top_logprob, top_index = jax.lax.top_k(candidates, min(2 * k, k * vocab))
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = jnp.take_along_axis(tokens, origin[..., None], axis=1)
        sequences = jax.lax.dynamic_update_index_in_dim(sequences, token, i + 1, axis=2)
        generated = (i + 2 - lengths_B)[:, None]  # tokens after the prompt, this one included
        ends = (token == eos_id) & ~forced
        rank = jnp.arange(top_index.shape[1])[None, :]
        finishing = ~forced & (rank < k) & (ends | (generated == max_new)) & (generated <= max_new)
        live_logprob, live = jax.lax.top_k(jnp.where(ends, NEG_INF, top_logprob), k)
        tokens = jnp.take_along_axis(sequences, live[..., None], axis=1)
        cache = gather_rows(cache, (base + jnp.take_along_axis(origin, live, axis=1)).reshape(-1))
        scores = jnp.where(finishing, _score(top_logprob, generated, length_penalty), NEG_INF)
        finished_scores, best = jax.lax.top_k(jnp.concatenate([finished_scores, scores], axis=1), k)
        finished_tokens = jnp.take_along_axis(jnp.concatenate([finished_tokens, sequences], axis=1),
                                              best[..., None], axis=1)
        return i + 1, tokens, live_logprob, cache, finished_tokens, finished_scores

    def keep_going(carry):
        i, _, live_logprob, _, _, finished_scores = carry
        upcoming = i + 2 - lengths_B
        bound = jnp.maximum(_score(live_logprob[:, 0], upcoming, length_penalty),
                            _score(live_logprob[:, 0], jnp.full_like(upcoming, max_new), length_penalty))
        done = (upcoming > max_new) | ((upcoming > 0) & (bound <= finished_scores[:, -1]))
        return (i < total - 1) & ~jnp.all(done)

    init = (jnp.asarray(first, jnp.int32), tokens, live_logprob, cache, tokens, finished_scores)
    _, tokens, live_logprob, _, finished_tokens, finished_scores = jax.lax.while_loop(keep_going, body, init)
    found = finished_scores[:, 0] > NEG_INF
    best = jnp.where(found[:, None], finished_tokens[:, 0], tokens[:, 0])
    unfinished = _score(live_logprob[:, 0], jnp.full_like(lengths_B, max_new), length_penalty)
    return _continuations(best, lengths_B, max_new), jnp.where(found, finished_scores[:, 0], unfinished)


# ------------------------------------------------------------------------------------------- models


def encoder_decoder_start(model: EncoderDecoder, params: Any, inputs_BS: Array, max_new: int,
                          copies: int = 1) -> tuple[StepFn, Any, Array, Array, int]:
    """Step function, cache (each row `copies` times), prompt (the start token), prompt lengths and the first
    position to feed (0)."""
    batch = inputs_BS.shape[0]
    variables = {"params": params}
    encoded = model.apply(variables, inputs_BS, method=model.encode)

    def allocate(length: int):
        targets = jnp.full((batch, length), PAD_ID, jnp.int32)
        return model.apply(variables, encoded, inputs_BS, targets, decode=True, mutable=["cache"],
                           method=model.decode)[1]["cache"]

    # The cross-attention keys/values come from a one-position call; the self-attention cache starts empty.
    shapes, short = jax.eval_shape(lambda: allocate(max_new)), allocate(1)
    cache = jax.tree.map(lambda s, x: x if x.shape == s.shape else jnp.zeros(s.shape, s.dtype), shapes, short)
    cache = repeat_rows(cache, batch, copies)
    inputs = jnp.repeat(inputs_BS, copies, axis=0)
    encoded = jnp.repeat(encoded, copies, axis=0)

    def step(tokens_N: Array, position: Array, cache: Any) -> tuple[Array, Any]:
        logits, updated = model.apply({"params": params, "cache": cache}, encoded, inputs, tokens_N[:, None],
                                      decode=True, position=position, cache_length=max_new, mutable=["cache"],
                                      method=model.decode)
        return logits[:, -1], updated["cache"]

    prompt = jnp.full((batch, 1), PAD_ID, jnp.int32)
    return step, cache, prompt, jnp.ones((batch,), jnp.int32), 0


def right_align(prompts_BT: Array, padding_BT: Array) -> tuple[Array, Array]:
    """Each row's real tokens moved to the right end (so left and right padding mean the same) and their counts."""
    order = jnp.argsort(padding_BT, axis=1, stable=True)  # padding first, real tokens after in their order
    lengths = jnp.sum(padding_BT, axis=1).astype(jnp.int32)
    moved = jnp.take_along_axis(prompts_BT, order, axis=1)
    width = prompts_BT.shape[1]
    return jnp.where(jnp.arange(width) >= width - lengths[:, None], moved, PAD_ID), lengths


def _rewind(cache: Any, slot: int) -> Any:
    """The cache with its write index moved back to `slot` (what follows is overwritten)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, slot) if _name(path) == "cache_index" else x, cache)


def decoder_only_start(model: Decoder, params: Any, prompts_BT: Array, padding_BT: Array | None, max_new: int,
                       copies: int = 1, prefix_lm: bool = False,
                       prefill_chunk: int = 0) -> tuple[StepFn, Any, Array, Array, int]:
    """Step function, prefilled cache (each row `copies` times), right-aligned prompts, their width (every
    row's prompt length) and the first position to feed (the prompts' last).

    Row n's tokens sit in cache slots from offset n = width - its prompt length on, at positions 0, 1, ...;
    the slots before are masked. The prefill runs every prompt token in one pass, causally or, with
    `prefix_lm`, each seeing the whole prompt (the prefix-LM objective's attention); with `prefill_chunk`, a
    causal prompt goes in that many tokens at a time (a loop), so one chunk's activations and attention scores
    exist at once instead of the whole prompt's. The search then feeds the last prompt token again: its keys and
    values come out the same, and its logits choose the first new token. An empty prompt is PAD, the start token
    causal-LM training feeds first. A soft prompt (prompt tuning) takes the cache's first slots, ahead of these.
    """
    padding = prompts_BT != PAD_ID if padding_BT is None else padding_BT.astype(bool)
    prompt, lengths = right_align(prompts_BT.astype(jnp.int32), padding)
    batch, width = prompt.shape
    cache_length = width + max_new - 1
    c = model.config
    if c.position in ("learned", "sinusoidal") and cache_length > c.max_length:
        raise UserError(f"a prompt of {width} tokens plus {max_new} new ones needs {cache_length} positions but "
                        f"model.max_length is {c.max_length}; shorten the prompts or lower eval.max_decode_length")
    offset = width - jnp.maximum(lengths, 1)  # [B]
    slots = jnp.arange(cache_length)
    keys = slots[None, :] >= offset[:, None]  # [B, S] real slots
    prefix = jnp.broadcast_to(slots < width, keys.shape) if prefix_lm else None
    ids = jax.ShapeDtypeStruct((batch, cache_length), jnp.int32)
    allocate = functools.partial(model.apply, {"params": params}, decode=True, write_soft_prompt=True,
                                 mutable=["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(allocate, ids)[1]["cache"])

    def run(tokens_NT: Array, position: Array | int, cache: Any, offset: Array, keys: Array,
            prefix: Array | None, prefill: bool = False, first: bool = False) -> tuple[Array, Any]:
        places = jnp.maximum(position + jnp.arange(tokens_NT.shape[1])[None, :] - offset[:, None], 0)
        out, updated = model.apply({"params": params, "cache": cache}, tokens_NT, decode=True, position=position,
                                   inputs_positions=places, cache_length=cache_length, padding=keys,
                                   inputs_prefix=prefix, return_hidden=prefill, write_soft_prompt=first,
                                   mutable=["cache"])
        return out[:, -1], updated["cache"]

    chunk = prefill_chunk if 0 < prefill_chunk < width else width
    if chunk < width and prefix_lm:
        raise UserError(PREFIX_LM_PREFILL_CHUNK)
    lead = width - (-(-width // chunk) - 1) * chunk  # 1..chunk tokens first, then a loop over equal chunks
    _, cache = run(prompt[:, :lead], 0, cache, offset, keys, prefix, prefill=True, first=True)  # the cache is all

    def prefill(i, cache):
        begin = lead + i * chunk
        tokens = jax.lax.dynamic_slice_in_dim(prompt, begin, chunk, axis=1)
        return run(tokens, begin, cache, offset, keys, prefix, prefill=True)[1]

    cache = jax.lax.fori_loop(0, (width - lead) // chunk, prefill, cache)
    cache = repeat_rows(_rewind(cache, c.prompt_length + width - 1), batch, copies)  # a soft prompt's slots first
    offset, keys = jnp.repeat(offset, copies, axis=0), jnp.repeat(keys, copies, axis=0)
    prefix = None if prefix is None else jnp.repeat(prefix, copies, axis=0)

    def step(tokens_N: Array, position: Array, cache: Any) -> tuple[Array, Any]:
        return run(tokens_N[:, None], position, cache, offset, keys, prefix)

    return step, cache, prompt, jnp.full((batch,), width, jnp.int32), width - 1


def start(model: EncoderDecoder | Decoder, params: Any, inputs: Array, max_new: int, copies: int = 1,
          padding: Array | None = None, prefix_lm: bool = False,
          prefill_chunk: int = 0) -> tuple[StepFn, Any, Array, Array, int]:
    """The step function, cache, prompts, prompt lengths and first position of either family."""
    if isinstance(model, EncoderDecoder):
        return encoder_decoder_start(model, params, inputs, max_new, copies)
    if isinstance(model, Decoder):
        return decoder_only_start(model, params, inputs, padding, max_new, copies, prefix_lm, prefill_chunk)
    raise UserError(f"model.family '{model.config.family}' does not generate text; decode an encoder_decoder "
                    f"or decoder model")


def greedy_decode(model: EncoderDecoder | Decoder, params: Any, inputs: Array, max_length: int, eos_id: int,
                  padding: Array | None = None, prefix_lm: bool = False, prefill_chunk: int = 0) -> Array:
    """Token ids [B, max_length] chosen by argmax at every step; PAD after each row's EOS."""
    step, cache, prompt, lengths, first = start(model, params, inputs, max_length, padding=padding,
                                                prefix_lm=prefix_lm, prefill_chunk=prefill_chunk)
    return search(step, cache, prompt, lengths, max_length, eos_id, first=first)


def sample_decode(model: EncoderDecoder | Decoder, params: Any, inputs: Array, max_length: int, eos_id: int,
                  rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  padding: Array | None = None, prefix_lm: bool = False, prefill_chunk: int = 0) -> Array:
    """Token ids [B, max_length] sampled from the temperature/top-k/top-p filtered distribution."""
    step, cache, prompt, lengths, first = start(model, params, inputs, max_length, padding=padding,
                                                prefix_lm=prefix_lm, prefill_chunk=prefill_chunk)
    return search(step, cache, prompt, lengths, max_length, eos_id, sampling_choice(rng, temperature, top_k, top_p),
                  first)


def beam_decode(model: EncoderDecoder | Decoder, params: Any, inputs: Array, max_length: int, eos_id: int,
                beam_size: int, length_penalty: float = 1.0, padding: Array | None = None,
                prefix_lm: bool = False, prefill_chunk: int = 0) -> tuple[Array, Array]:
    """The best beam's token ids [B, max_length] and its score [B]."""
    step, cache, prompt, lengths, first = start(model, params, inputs, max_length, beam_size, padding, prefix_lm,
                                                prefill_chunk)
    return beam_search(step, cache, prompt, lengths, max_length, eos_id, beam_size, length_penalty, first)


def generate(model: EncoderDecoder | Decoder, params: Any, inputs: Array, max_length: int, eos_id: int,
             config: DecodeConfig = DecodeConfig(), rng: Array | None = None,
             padding: Array | None = None, prefix_lm: bool = False) -> Array:
    """Token ids [B, max_length] by the method `config` names: beam search, sampling or greedy. `prefix_lm`: a
    decoder-only model's prompts attend to each other both ways (a model trained with task prefix_lm)."""
    chunk = config.prefill_chunk
    if config.beam_size > 1:
        return beam_decode(model, params, inputs, max_length, eos_id, config.beam_size, config.length_penalty,
                           padding, prefix_lm, chunk)[0]
    if config.sample:
        rng = jax.random.key(config.seed) if rng is None else rng
        return sample_decode(model, params, inputs, max_length, eos_id, rng, config.temperature, config.top_k,
                             config.top_p, padding, prefix_lm, chunk)
    return greedy_decode(model, params, inputs, max_length, eos_id, padding, prefix_lm, chunk)


def describe(config: DecodeConfig) -> str:
    """A short name of the decoding method, e.g. 'beam4' or 'sample(t=0.7,k=40,p=1.0)'."""
    if config.beam_size > 1:
        return f"beam{config.beam_size}(length_penalty={config.length_penalty})"
    if config.sample:
        return f"sample(temperature={config.temperature},top_k={config.top_k},top_p={config.top_p})"
    return "greedy"


def make_decoder(model: EncoderDecoder | Decoder, decode_config: DecodeConfig, max_length: int, eos_id: int,
                 param_shardings: Any, batch_sharding: NamedSharding, prefix_lm: bool = False) -> Callable[..., Array]:
    """A jitted `(params, inputs, rng=None, padding=None) -> ids [B, max_length]`, sharded like training.

    Encoder-decoder inputs are source ids; decoder-only inputs are prompts, padded on either side (`padding`
    True at real tokens; by default the non-PAD ids), and the ids are their continuations. `rng` (sampling
    only) defaults to jax.random.key(decode.seed).
    """
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    run = jax.jit(lambda params, inputs, padding, rng: generate(model, params, inputs, max_length, eos_id,
                                                                 decode_config, rng, padding, prefix_lm),
                  in_shardings=(param_shardings, batch_sharding, batch_sharding, replicated),
                  out_shardings=batch_sharding)

    def decoder(params: Any, inputs: Array, rng: Array | None = None, padding: Array | None = None) -> Array:
        padding = inputs != PAD_ID if padding is None else padding
        return run(params, inputs, padding, jax.random.key(decode_config.seed) if rng is None else rng)

    return decoder


def make_greedy_decoder(model: EncoderDecoder, max_length: int, eos_id: int, param_shardings: Any,
                        batch_sharding: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted `(params, inputs) -> token ids`, sharded like training."""
    return jax.jit(lambda params, inputs: greedy_decode(model, params, inputs, max_length, eos_id),
                   in_shardings=(param_shardings, batch_sharding), out_shardings=batch_sharding)
