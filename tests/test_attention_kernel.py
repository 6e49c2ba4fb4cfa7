"""model.attention_kernel: the cuDNN switch reaches every training attention call (and not decoding's), its
`causal` hint is true wherever it is given, and the config and device checks name the key and the fix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosswrite_jax import config as config_lib
from crosswrite_jax import sharding
from crosswrite_jax.errors import UserError
from crosswrite_jax.models import presets
from crosswrite_jax.models.transformer import build_model

REAL_ATTENTION = jax.nn.dot_product_attention
SIZES = dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, head_dim=8, dropout_rate=0.0, dtype="bfloat16",
             attention_kernel="cudnn")


@pytest.fixture
def calls(monkeypatch):
    """Records (kernel, is_causal, query length, key length) of each attention call and runs it with XLA,
    checking on the way that is_causal, where claimed, does not change the result (the mask is causal)."""
    seen = []

    def recording(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, implementation=None, **kw):
        seen.append((implementation, is_causal, q.shape[1], k.shape[1]))
        if implementation == "cudnn":  # cuDNN turns the mask into a bias, which must span [T, S] (jax checks it)
            for extra in (mask, bias):
                assert extra is None or extra.shape[-2:] == (q.shape[1], k.shape[1]), extra.shape
        out = REAL_ATTENTION(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla", **kw)
        if is_causal:
            with_hint = REAL_ATTENTION(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=True,
                                       implementation="xla", **kw)
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(with_hint, np.float32))
        return out

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    return seen


def _apply(calls, model_config, *args, **kwargs):
    """Calls of one forward pass (not of the init before it)."""
    model = build_model(model_config)
    params = model.init(jax.random.key(0), *args)
    calls.clear()
    model.apply(params, *args, **kwargs)
    return list(calls)


def test_causal_lm_runs_every_layer_on_cudnn_with_the_causal_hint(calls):
    config = presets.llama(num_decoder_layers=2, num_kv_heads=2, **SIZES)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 8)), jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    assert _apply(calls, config, ids) == [("cudnn", True, 8, 8)] * 2
    assert _apply(calls, config, ids, inputs_segments=segments) == [("cudnn", True, 8, 8)] * 2


def test_a_prefix_lm_prompt_is_not_called_causal(calls):
    config = presets.llama(num_decoder_layers=2, **SIZES)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 64, (2, 8)), jnp.int32)
    prefix = jnp.asarray([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, jnp.int32)
    assert _apply(calls, config, ids, inputs_prefix=prefix) == [("cudnn", False, 8, 8)] * 2


def test_encoder_decoder_hints_only_the_decoder_self_attention(calls):
    config = presets.t5("1.1", num_encoder_layers=1, num_decoder_layers=1, **SIZES)
    inputs = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, 6)), jnp.int32)
    targets = jnp.asarray(np.random.default_rng(3).integers(1, 64, (2, 8)), jnp.int32)
    # encoder self-attention, decoder self-attention, cross-attention
    assert _apply(calls, config, inputs, targets) == [("cudnn", False, 6, 6), ("cudnn", True, 8, 8),
                                                      ("cudnn", False, 8, 6)]


def test_decoding_from_a_cache_uses_xla(calls):
    config = presets.llama(num_decoder_layers=1, **SIZES)
    model = build_model(config)
    prompt = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), prompt)["params"]
    cache = model.init(jax.random.key(0), jnp.ones((1, 16), jnp.int32), decode=True)["cache"]
    calls.clear()
    model.apply({"params": params, "cache": cache}, prompt, decode=True, cache_length=16, mutable=["cache"])
    assert calls and all(kernel == "xla" for kernel, *_ in calls)


def test_config_checks_name_the_key_and_the_fix(tiny):
    with pytest.raises(UserError, match="model.attention_kernel.*choose one of xla, cudnn"):
        tiny(model__attention_kernel="flash")
    with pytest.raises(UserError, match="no float32 kernel.*model.dtype=bfloat16"):
        tiny(model__attention_kernel="cudnn")
    with pytest.raises(UserError, match="multiple of 8 up to 256, but it is 12"):
        tiny(model__attention_kernel="cudnn", model__dtype="bfloat16", model__head_dim=12)
    config = tiny(model__attention_kernel="cudnn", model__dtype="bfloat16")
    assert config.model.attention_kernel == "cudnn"


def test_training_with_cudnn_on_a_cpu_says_what_to_set(tiny):
    from crosswrite_jax.trainer import Trainer

    config = tiny(model__attention_kernel="cudnn", model__dtype="bfloat16")
    with pytest.raises(UserError, match="devices are cpu; set --config.model.attention_kernel=xla"):
        Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    xla = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_kernel="xla"))
    config_lib.validate(xla)
    Trainer.build(xla, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
