"""Decoding: cached greedy equals uncached argmax, beam search and sampling behave as specified, and greedy
decoding of converted Hugging Face T5 / Llama models gives transformers' `generate` ids."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn

from crosswrite_jax import sharding
from crosswrite_jax.config import DecodeConfig
from crosswrite_jax.decode import (
    beam_decode,
    beam_search,
    filter_logits,
    greedy_decode,
    make_decoder,
    sample_decode,
    sampling_choice,
    search,
)
from crosswrite_jax.models.transformer import EncoderDecoder, build_model, param_shapes
from crosswrite_jax.tasks import check_config

EOS = 1


@functools.lru_cache(maxsize=None)
def _tiny_seq2seq():
    """A tiny random encoder-decoder whose outputs vary by position, its params and a batch of inputs."""
    config = tiny_config(model__dropout_rate=0.0, model__tie_output_embedding=False).model
    model = EncoderDecoder(config)
    inputs = jax.random.randint(jax.random.key(1), (4, 9), 3, config.vocab_size).at[0, 6:].set(0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), inputs, inputs))["params"]  # fast
    # Sharpen the output layer so different positions prefer different tokens.
    params["output"]["kernel"] = params["output"]["kernel"] * 8.0
    return model, params, inputs


@functools.lru_cache(maxsize=None)
def _tiny_seq2seq_greedy():
    """Greedy ids [4, 12] of the tiny encoder-decoder."""
    model, params, inputs = _tiny_seq2seq()
    return np.asarray(jax.jit(lambda p, x: greedy_decode(model, p, x, 12, EOS))(params, inputs))


@functools.lru_cache(maxsize=None)
def _tiny_seq2seq_beam4():
    """Beam-4 (length penalty 1) ids [4, 12] and scores [4] of the tiny encoder-decoder."""
    model, params, inputs = _tiny_seq2seq()
    four = jax.jit(lambda p, x: beam_decode(model, p, x, 12, EOS, beam_size=4, length_penalty=1.0))
    return tuple(np.asarray(a) for a in four(params, inputs))


@functools.lru_cache(maxsize=None)
def _tiny_seq2seq_forward():
    """The tiny encoder-decoder's jitted teacher-forced logits `(inputs, targets) -> [B, T, V]`."""
    model, params, _ = _tiny_seq2seq()
    return jax.jit(lambda x, y: model.apply({"params": params}, x, y))


def _seq2seq_scores(inputs, ids, length_penalty):
    """Teacher-forced sum of log-probs of each row up to its EOS, / length ** length_penalty."""
    logprobs = jax.nn.log_softmax(_tiny_seq2seq_forward()(inputs, jnp.asarray(ids)))
    return _scores(np.take_along_axis(np.asarray(logprobs), ids[..., None], axis=-1)[..., 0], ids, length_penalty)


def _scores(token_logprobs, ids, length_penalty):
    out = []
    for row_logprobs, row in zip(token_logprobs, ids):
        eos = np.flatnonzero(row == EOS)
        end = eos[0] + 1 if eos.size else len(row)
        out.append(row_logprobs[:end].sum() / end ** length_penalty)
    return np.array(out)


def test_cached_greedy_equals_uncached_argmax():
    _, _, inputs = _tiny_seq2seq()
    steps = 12
    cached = _tiny_seq2seq_greedy()

    # Full teacher-forced passes: the logits at position i see targets < i only (causal), so
    # filling one position per pass reproduces step-by-step argmax without any cache.
    forward = _tiny_seq2seq_forward()
    expected = np.zeros((4, steps), np.int32)
    for i in range(steps):
        expected[:, i] = np.argmax(np.asarray(forward(inputs, jnp.asarray(expected)))[:, i], axis=-1)
    for row_cached, row_expected in zip(cached, expected):
        eos = np.flatnonzero(row_expected == EOS)
        end = eos[0] + 1 if eos.size else steps
        np.testing.assert_array_equal(row_cached[:end], row_expected[:end])
        assert (row_cached[end:] == 0).all()  # padding after EOS
    assert len({tuple(r) for r in expected}) > 1 and len(set(expected[0])) > 2  # a non-trivial case


@pytest.mark.parametrize("position, prefix_lm", [("rope", False), ("rope", True), ("learned", False),
                                               ("learned", True)])
def test_decoder_only_prefill_greedy_equals_uncached_argmax(position, prefix_lm):
    """Prompts of different lengths, padded on either side, prefilled in one pass: each row's greedy ids equal
    argmax over full forward passes of that row alone (a prefix LM's prompt marked as its prefix). Learned
    positions check that each row's positions start at 0 whatever its padding (RoPE would not notice)."""
    from crosswrite_jax.models.presets import llama

    config = llama(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_decoder_layers=2,
                   max_length=32, position=position)
    model = build_model(config)
    rows = [[5, 6, 7, 8, 9], [13, 14], [20, 21, 22, 23], []]
    right = np.array([r + [0] * (5 - len(r)) for r in rows])
    left = np.array([[0] * (5 - len(r)) + r for r in rows])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(3), jnp.asarray(right)))["params"]
    params["output"]["kernel"] = params["output"]["kernel"] * 8.0
    steps = 6
    greedy = jax.jit(lambda p, x: greedy_decode(model, p, x, steps, EOS, prefix_lm=prefix_lm))
    ours = np.asarray(greedy(params, right))
    np.testing.assert_array_equal(np.asarray(greedy(params, left)), ours)

    assert_uncached_argmax(model, params, rows, ours, prefix_lm)


def assert_uncached_argmax(model, params, rows, generated_NL, prefix_lm):
    """Each row's generated ids are argmax over full forward passes of that row alone, PAD after EOS."""
    forward = jax.jit(lambda ids, prefix: model.apply({"params": params}, ids, inputs_prefix=prefix))
    steps = generated_NL.shape[1]
    for row, generated in zip(rows, np.asarray(generated_NL).tolist()):
        sequence = list(row) or [0]  # an empty prompt starts from PAD
        expected = []
        for _ in range(steps):
            ids = jnp.asarray([sequence])
            prefix = (jnp.arange(len(sequence)) < len(row))[None].astype(jnp.int32) if prefix_lm else None
            token = int(jnp.argmax(forward(ids, prefix)[0, -1]))
            expected.append(token)
            sequence.append(token)
            if token == EOS:
                break
        assert generated == expected + [0] * (steps - len(expected))


@pytest.mark.parametrize("chunk", [2, 3, 8])
def test_chunked_prefill_decodes_the_same(chunk):
    """Prompts of 7 slots prefilled 2 or 3 tokens at a time (a shorter first chunk for 2 and 3; 8 is one pass)
    give the one-pass prefill's greedy, sampled and beam ids; a prefix LM's prompt cannot be split."""
    from crosswrite_jax.decode import generate
    from crosswrite_jax.errors import UserError
    from crosswrite_jax.models.presets import llama

    config = llama(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_decoder_layers=2,
                   max_length=32)
    model = build_model(config)
    rows = [[5, 6, 7, 8, 9, 10, 11], [13, 14], [20, 21, 22, 23], []]
    left = jnp.asarray([[0] * (7 - len(r)) + r for r in rows])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(3), left))["params"]
    params["output"]["kernel"] = params["output"]["kernel"] * 8.0
    for how in (DecodeConfig(), DecodeConfig(sample=True, temperature=1.5), DecodeConfig(beam_size=3)):
        run = lambda c: np.asarray(jax.jit(lambda p, x: generate(model, p, x, 6, EOS, c))(params, left))  # noqa: E731
        whole = run(how)
        np.testing.assert_array_equal(run(dataclasses.replace(how, prefill_chunk=chunk)), whole)
        assert len({tuple(r) for r in whole.tolist()}) > 1
    with pytest.raises(UserError, match="decode.prefill_chunk"):
        greedy_decode(model, params, left, 6, EOS, prefix_lm=True, prefill_chunk=3)
    with pytest.raises(UserError, match="prefix LM's prompt attends both ways"):
        check_config(tiny_config(task="prefix_lm", model__family="decoder", decode__prefill_chunk=4))
    with pytest.raises(UserError, match="'decode.prefill_chunk' must be >= 0"):
        tiny_config(decode__prefill_chunk=-1)


def test_prefix_lm_decoding_differs_from_causal():
    """The flag reaches the model: a prefix LM's prompt tokens see each other both ways, so the ids change."""
    from crosswrite_jax.models.presets import llama

    config = llama(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_decoder_layers=2,
                   max_length=32)
    model = build_model(config)
    prompts = jnp.asarray([[5, 6, 7, 8, 9], [13, 14, 15, 0, 0], [20, 21, 22, 23, 0]])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(3), prompts))["params"]
    params["output"]["kernel"] = params["output"]["kernel"] * 8.0
    causal, prefix = (np.asarray(jax.jit(lambda p, x, flag=flag: greedy_decode(model, p, x, 6, EOS, prefix_lm=flag))(
        params, prompts)) for flag in (False, True))
    assert (causal != prefix).any()


def test_beam_of_one_is_greedy_and_beams_score_what_the_model_scores():
    model, params, inputs = _tiny_seq2seq()
    greedy = _tiny_seq2seq_greedy()
    one = jax.jit(lambda p, x: beam_decode(model, p, x, 12, EOS, beam_size=1, length_penalty=0.0))
    np.testing.assert_array_equal(np.asarray(one(params, inputs)[0]), greedy)

    ids, scores = _tiny_seq2seq_beam4()
    # The reported score is the model's teacher-forced score of the returned sequence (the cache followed
    # each beam's origin), and it is at least greedy's.
    np.testing.assert_allclose(scores, _seq2seq_scores(inputs, ids, 1.0), atol=1e-4)
    assert (scores >= _seq2seq_scores(inputs, greedy, 1.0) - 1e-5).all()
    assert (ids != greedy).any()  # beam search changed something in this batch


# A made-up 5-token model: 0 pad, 1 EOS, 2 A, 3 B, 4 C. The first token's distribution is the same in both
# rows; later ones depend on the row and on the first generated token, which the "cache" remembers (so a
# beam whose cache row is not gathered by its origin goes wrong).
def _fake_distribution(row, first, position):
    def p(eos, a, b, c):
        return jnp.array([1e-6, eos, a, b, c])

    if_a = jnp.where(row[:, None] == 0, p(.28, .24, .24, .24), p(.95, .05 / 3, .05 / 3, .05 / 3))
    b_next = jnp.where(position < 3, p(.1 / 3, .1 / 3, .1 / 3, .9), p(.9, .1 / 3, .1 / 3, .1 / 3))
    if_b = jnp.where(row[:, None] == 0, b_next[None], p(.25, .25, .25, .25))
    if_c = p(.97, .01, .01, .01)
    later = jnp.where((first == 2)[:, None], if_a, jnp.where((first == 3)[:, None], if_b, if_c))
    return jnp.where(position == 0, p(1e-6, .5, .4, .1)[None], later)


def _fake_model(batch, copies):
    def step(tokens, position, cache):
        first = jnp.where(position == 1, tokens, cache["first"])
        logits = jnp.log(_fake_distribution(cache["row"], first, position))
        return logits, {"row": cache["row"], "first": first, "cache_index": cache["cache_index"] + 1}

    cache = {"row": jnp.repeat(jnp.arange(batch), copies), "first": jnp.zeros(batch * copies, jnp.int32),
             "cache_index": jnp.zeros((), jnp.int32)}
    return step, cache, jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch,), jnp.int32)


def test_beam_search_finds_the_better_sequence_greedy_misses():
    greedy = np.asarray(jax.jit(lambda: search(*_fake_model(2, 1), max_new=6, eos_id=EOS))())
    np.testing.assert_array_equal(greedy, [[2, 1, 0, 0, 0, 0], [2, 1, 0, 0, 0, 0]])
    beam = jax.jit(lambda k, alpha: beam_search(*_fake_model(2, k), max_new=6, eos_id=EOS, beam_size=k,
                                                length_penalty=alpha), static_argnums=0)
    for length_penalty in (0.0, 1.0):
        ids, scores = beam(3, length_penalty)
        # Row 0: A is likelier first, but B C C EOS is the likelier sequence; row 1: A EOS is best.
        np.testing.assert_array_equal(np.asarray(ids), [[3, 4, 4, 1, 0, 0], [2, 1, 0, 0, 0, 0]])
        expected = np.log([.4 * .9 * .9 * .9, .5 * .95]) / np.array([4, 2]) ** length_penalty
        np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5)
        greedy_score = np.log(.5 * .28) / 2 ** length_penalty
        assert scores[0] > greedy_score
    one, _ = beam(1, 0.0)
    np.testing.assert_array_equal(np.asarray(one), greedy)


def test_sampling_top_k_one_is_greedy_and_a_seed_fixes_the_output():
    model, params, inputs = _tiny_seq2seq()
    greedy = _tiny_seq2seq_greedy()
    sample = jax.jit(lambda p, x, key: sample_decode(model, p, x, 12, EOS, key, temperature=1.5))
    first, again, other = (np.asarray(sample(params, inputs, jax.random.key(s))) for s in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any() and (first != greedy).any()
    # top_k=1 leaves only the argmax: sampling is greedy, whatever the key (through make_decoder's sampling path).
    mesh = sharding.make_mesh((-1, 1, 1))
    decode = make_decoder(model, DecodeConfig(sample=True, top_k=1, temperature=2.0), 12, EOS,
                          sharding.replicated(mesh), sharding.batch_sharding(mesh))
    ids = decode(params, jax.device_put(jnp.tile(inputs, (2, 1)), sharding.batch_sharding(mesh)), jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(ids), np.tile(greedy, (2, 1)))


def test_temperature_top_k_and_top_p_filters_on_a_fixed_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    kept = lambda **kw: np.asarray(jax.nn.softmax(filter_logits(logits, **kw)))[0]  # noqa: E731
    np.testing.assert_allclose(kept(temperature=2.0), np.sqrt(probs) / np.sqrt(probs).sum(), rtol=1e-5)
    np.testing.assert_allclose(kept(top_k=2), [0.625, 0.375, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(kept(top_p=0.7), [0.625, 0.375, 0, 0], rtol=1e-5)  # smallest set with mass >= p
    np.testing.assert_allclose(kept(top_p=0.9), [0.5 / .95, 0.3 / .95, 0.15 / .95, 0], rtol=1e-5)
    np.testing.assert_allclose(kept(top_p=0.4), [1, 0, 0, 0])
    np.testing.assert_allclose(kept(top_k=3, top_p=0.7, temperature=0.5), [25 / 34, 9 / 34, 0, 0], rtol=1e-5)
    draws = sampling_choice(jax.random.key(0), top_p=0.9)(jnp.tile(logits, (20000, 1)), jnp.int32(0))
    frequencies = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(frequencies, [0.5 / .95, 0.3 / .95, 0.15 / .95, 0], atol=0.015)


def test_make_decoder_greedy_and_beam_are_sharded_like_the_batch():
    model, params, inputs = _tiny_seq2seq()
    mesh = sharding.make_mesh((-1, 1, 1))
    replicated, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    expected = {1: _tiny_seq2seq_greedy(), 4: _tiny_seq2seq_beam4()[0]}
    for config in (DecodeConfig(length_penalty=0.5), DecodeConfig(beam_size=4, length_penalty=1.0)):
        decode = make_decoder(model, config, 12, EOS, replicated, rows)
        ids = decode(params, jax.device_put(jnp.tile(inputs, (2, 1)), rows))  # 8 rows over 8 devices
        assert ids.shape == (8, 12) and ids.sharding.is_equivalent_to(rows, 2)
        np.testing.assert_array_equal(np.asarray(ids), np.tile(expected[config.beam_size], (2, 1)))


# ----------------------------------------------------------------------------- Hugging Face parity


def _converted(hf_model, tmp_path):
    """Our (model, params) for a randomized transformers model, through a safetensors directory."""
    import torch

    from crosswrite_jax.models import hf

    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_model.eval().save_pretrained(tmp_path)
    hf_config, tensors = hf.read_checkpoint(tmp_path)
    kind, config = hf.config_from_hf(hf_config, tensors)
    config = config.__class__(**{**config.__dict__, "dropout_rate": 0.0})
    return build_model(config), hf.params_from_hf(kind, config, tensors, param_shapes(config))


def _assert_same_until_eos(ours, theirs, eos):
    """Equal ids up to each row's EOS (HF stops a batch once every row ends: the rest of ours is padding)."""
    width = theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :width], theirs)
    assert (ours[:, width:] == 0).all() and all(eos in row or len(row) == ours.shape[1] for row in theirs.tolist())


def test_greedy_matches_transformers_generate_for_t5(tmp_path):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    hf_model = T5ForConditionalGeneration(T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS))
    model, params = _converted(hf_model, tmp_path)
    inputs = np.array([[5, 6, 7, 8, 9, 10, 11, 1], [13, 14, 15, 1, 0, 0, 0, 0], [40, 41, 42, 43, 44, 1, 0, 0]])
    ours = np.asarray(jax.jit(lambda p, x: greedy_decode(model, p, x, 10, EOS))(params, inputs))
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                                   max_new_tokens=10, do_sample=False, num_beams=1).numpy()
    assert (theirs[:, 0] == 0).all()  # the decoder start token
    _assert_same_until_eos(ours, theirs[:, 1:], EOS)


def test_greedy_matches_transformers_generate_for_llama_with_either_padding(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2))
    model, params = _converted(hf_model, tmp_path)
    rows = [[1, 5, 6, 7, 8, 9], [1, 13, 14], [1, 40, 41, 42, 43]]
    left = np.array([[0] * (6 - len(r)) + r for r in rows])
    right = np.array([r + [0] * (6 - len(r)) for r in rows])
    greedy = jax.jit(lambda p, x: greedy_decode(model, p, x, 8, eos_id=2))
    ours = np.asarray(greedy(params, left))
    np.testing.assert_array_equal(np.asarray(greedy(params, right)), ours)
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(left != 0),
                                   max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=0).numpy()
    _assert_same_until_eos(ours, theirs[:, left.shape[1]:], 2)

    # Beam search over forced prompts of different lengths: each score is the model's score of its sequence.
    ids, scores = jax.jit(lambda p, x: beam_decode(model, p, x, 8, 2, beam_size=3, length_penalty=1.0))(params, left)
    for row, generated, score in zip(rows, np.asarray(ids).tolist(), np.asarray(scores)):
        end = generated.index(2) + 1 if 2 in generated else len(generated)
        with torch.no_grad():
            logits = hf_model(torch.tensor([row + generated[:end]])).logits[0, len(row) - 1:-1]
        logprob = torch.log_softmax(logits, -1)[torch.arange(end), torch.tensor(generated[:end])].sum().item()
        assert score == pytest.approx(logprob / end, abs=1e-4)
