"""Model behaviour: packed rows equal separate examples; the padding and dtype options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn

from crosswrite_jax.models.layers import flat_matmul
from crosswrite_jax.models.transformer import EncoderDecoder


def _model_and_params(**overrides):
    config = tiny_config(model__dropout_rate=0.0, **overrides).model
    model = EncoderDecoder(config)
    dummy = jnp.ones((1, 8), jnp.int32)
    return model, nn.unbox(model.init(jax.random.key(0), dummy, dummy))["params"], config


def test_packed_row_gives_the_logits_of_each_example_alone():
    model, params, config = _model_and_params()
    rng = np.random.default_rng(0)
    a_src, b_src = rng.integers(3, config.vocab_size, 5), rng.integers(3, config.vocab_size, 7)
    a_tgt, b_tgt = rng.integers(3, config.vocab_size, 4), rng.integers(3, config.vocab_size, 6)

    def row(*parts, width):
        ids, seg, pos = np.zeros(width, np.int32), np.zeros(width, np.int32), np.zeros(width, np.int32)
        at = 0
        for s, part in enumerate(parts, start=1):
            ids[at:at + len(part)], seg[at:at + len(part)], pos[at:at + len(part)] = part, s, np.arange(len(part))
            at += len(part)
        return ids[None], seg[None], pos[None]

    inputs, inputs_segments, inputs_positions = row(a_src, b_src, width=16)
    targets, targets_segments, targets_positions = row(a_tgt, b_tgt, width=12)
    packed = model.apply({"params": params}, inputs, targets, inputs_segments=inputs_segments,
                         inputs_positions=inputs_positions, targets_segments=targets_segments,
                         targets_positions=targets_positions)[0]
    alone_a = model.apply({"params": params}, row(a_src, width=8)[0], row(a_tgt, width=8)[0])[0]
    alone_b = model.apply({"params": params}, row(b_src, width=8)[0], row(b_tgt, width=8)[0])[0]
    np.testing.assert_allclose(packed[:4], alone_a[:4], atol=1e-5)
    np.testing.assert_allclose(packed[4:10], alone_b[:6], atol=1e-5)
    assert not np.allclose(alone_a[:4], alone_b[:4], atol=1e-3)  # the comparison can tell examples apart


def test_padding_does_not_change_real_positions():
    model, params, config = _model_and_params()
    inputs = np.array([[5, 6, 7, 1]], np.int32)
    targets = np.array([[8, 9, 1]], np.int32)
    short = model.apply({"params": params}, inputs, targets)
    padded = model.apply({"params": params}, np.pad(inputs, ((0, 0), (0, 4))), np.pad(targets, ((0, 0), (0, 5))))
    np.testing.assert_allclose(short[0], padded[0, :3], atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
    model, params, _ = _model_and_params(model__dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = np.array([[5, 6, 7, 1]], np.int32)
    out = model.apply({"params": params}, x, x)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    reference, reference_params, _ = _model_and_params()
    np.testing.assert_allclose(out, reference.apply({"params": reference_params}, x, x), atol=0.1)


def _initial_score_std(model_config) -> float:
    """Standard deviation of the first encoder layer's initial attention scores q.k for unit-variance inputs."""
    model = EncoderDecoder(model_config)
    ids = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), ids, ids))["params"]
    attention = params["encoder"]["layer_0"]["self_attention"]
    x = jax.random.normal(jax.random.key(1), (256, model_config.d_model))
    q = jnp.einsum("nd,dhk->nhk", x, attention["query"]["kernel"])
    k = jnp.einsum("nd,dhk->nhk", x, attention["key"]["kernel"])
    return float(jnp.std(jnp.einsum("nhk,mhk->hnm", q, k)))


def test_attention_starts_with_unit_scale_scores_with_the_scale_folded_in_or_applied():
    """T5 folds the 1/sqrt(head_dim) score scale into its query (scale_attention=False, as imported T5 runs of
    older versions have it); this project's T5 preset applies it in attention instead. Either way the softmax does
    not start saturated (with plain fan-in init and no scale, the scores' deviation is sqrt(head_dim))."""
    from crosswrite_jax.models.presets import t5

    sizes = dict(vocab_size=64, d_model=128, num_heads=2, d_ff=64, num_encoder_layers=1, num_decoder_layers=1)
    assert 0.7 < _initial_score_std(t5("1.1", scale_attention=False, **sizes)) < 1.4  # head_dim 64: 8 if unfolded
    applied = _initial_score_std(t5("1.1", **sizes))  # q.k before the applied 1/sqrt(head_dim)
    assert 5.6 < applied < 11.3


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_t5_starts_like_the_quickstart_transformer(version):
    """The T5 init fix: tokens enter at unit scale, logits start at unit scale, and every projection starts at
    fan-in scale (so Adam's fixed step sizes move each weight at the same rate relative to its size).

    Before the fix, T5 v1.1's tied, unscaled output shrank the token table to d_model**-0.5 (tokens entered 16x
    below the sublayer outputs, and the table moved 16x faster than the projections), its query carried the score
    scale (8x faster), the relative bias started at std 1 (16x slower), and then its final norm's stored gain,
    the output temperature, started at d_model**-0.5 (16x faster)."""
    from crosswrite_jax.models.layers import relative_bias_multiplier
    from crosswrite_jax.models.presets import t5
    from crosswrite_jax.models.transformer import output_norm_multiplier

    config = t5(version, vocab_size=512, d_model=256, num_heads=4, d_ff=256, num_encoder_layers=2,
                num_decoder_layers=2, dropout_rate=0.0)
    model = EncoderDecoder(config)
    ids = jax.random.randint(jax.random.key(2), (8, 16), 2, config.vocab_size)
    params = nn.unbox(model.init(jax.random.key(0), ids, ids))["params"]
    embedded = model.apply({"params": params}, ids, jnp.broadcast_to(jnp.arange(16), ids.shape),
                           method=lambda m, x, p: m.embedder(x, p))
    assert 0.9 < float(jnp.sqrt(jnp.mean(embedded ** 2))) < 1.1
    assert 0.8 < float(jnp.std(model.apply({"params": params}, ids, ids))) < 1.25
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.endswith("/kernel"):
            fan_in = int(np.prod(leaf.shape[:-1] if "/out/" in name else leaf.shape[:1]))
            assert 0.8 < float(jnp.std(leaf)) * fan_in ** 0.5 < 1.1, name
    for stack in ("encoder", "decoder"):  # stored over its multiplier: the bias starts at std d_model**-0.5
        table = params[stack]["relative_attention_bias"]["embedding"] * relative_bias_multiplier(config)
        assert 0.5 < float(jnp.std(table)) * config.d_model ** 0.5 < 1.5
    assert np.allclose(params["decoder"]["final_norm"]["scale"], 1.0)  # every stored gain starts at 1
    assert output_norm_multiplier(config) == (1.0 if version == "1.0" else config.d_model ** -0.5)


def test_t5_relative_bias_moves_at_the_pace_of_the_scores():
    """The relative-bias fix: one Adam step moves every bias entry by lr * d_model**0.5, not by lr.

    Stored as transformers stores it, the bias could move at most 1 nat over the quickstart's whole run while the
    query-key scores beside it moved freely; T5 trailed the quickstart by 3.6 BLEU."""
    import optax

    from crosswrite_jax.models.layers import RelativePositionBias
    from crosswrite_jax.models.presets import t5

    config = t5("1.1", vocab_size=512, d_model=256, num_heads=4, d_ff=256, num_encoder_layers=1,
                num_decoder_layers=1, relative_buckets=8)
    module = RelativePositionBias(config, bidirectional=True)
    positions = jnp.arange(12)[None]
    params = nn.unbox(module.init(jax.random.key(0), positions, positions))
    target = jax.random.normal(jax.random.key(1), (1, 4, 12, 12))

    def loss(p):
        return jnp.sum(module.apply(p, positions, positions) * target)

    lr = 1e-3
    optimizer = optax.adam(lr)
    updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params), params)
    before = module.apply(params, positions, positions)
    after = module.apply(optax.apply_updates(params, updates), positions, positions)
    np.testing.assert_allclose(np.abs(np.asarray(after - before)), lr * config.d_model ** 0.5, rtol=1e-3)
    assert 0.5 < float(jnp.std(before)) * config.d_model ** 0.5 < 1.5  # starts at transformers' T5 init


def test_flat_matmul_equals_dot_general_over_trailing_axes():
    keys = jax.random.split(jax.random.key(1), 2)
    x, kernel = jax.random.normal(keys[0], (2, 3, 4, 5)), jax.random.normal(keys[1], (4, 5, 6, 7))
    expected = jax.lax.dot_general(x, kernel, (((2, 3), (0, 1)), ((), ())))
    np.testing.assert_allclose(flat_matmul(x, kernel, 2), expected, rtol=1e-5, atol=1e-5)
    assert flat_matmul(x, kernel[:, :, 0, 0], 2).shape == (2, 3)
