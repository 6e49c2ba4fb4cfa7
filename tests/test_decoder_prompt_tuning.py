"""Prompt tuning on decoder-only models: a learned soft prompt before the tokens (Hugging Face PEFT's virtual tokens).
Outputs keep one row per token; the KV-cached decoders (greedy, chunked prefill, beam, sampling) write the prompt
into the cache's first slots and choose what the uncached forward chooses; only the prompt (and a classifier)
trains. Tiny models, offline."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from flax import linen as nn
from flax import traverse_util
from test_decode import EOS, assert_uncached_argmax

from crosswrite_jax import config as config_lib
from crosswrite_jax import peft, sharding
from crosswrite_jax.config import DecodeConfig
from crosswrite_jax.decode import generate, greedy_decode
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.presets import llama
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.trainer import Trainer

PROMPT = 3
SEARCHES = (DecodeConfig(), DecodeConfig(beam_size=3), DecodeConfig(sample=True, temperature=1.5))


def _model(position: str = "rope", scan: bool = False, prompt_length: int = PROMPT, **extra):
    config = llama(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_decoder_layers=2,
                   max_length=32, position=position, scan_layers=scan, prompt_length=prompt_length, **extra)
    model = build_model(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(3), jnp.ones((1, 5), jnp.int32)))["params"]
    if "output" in params:
        params["output"]["kernel"] = params["output"]["kernel"] * 8.0
    return model, params


def test_outputs_keep_their_shape_and_the_prompt_is_seen_by_every_token():
    model, params = _model()
    assert params["prompt"]["embedding"].shape == (PROMPT, 32)
    ids = jnp.asarray([[5, 6, 7, 8, 9], [13, 14, 0, 0, 0]])
    logits = model.apply({"params": params}, ids)
    assert logits.shape == (2, 5, 40)
    assert model.apply({"params": params}, ids, return_hidden=True).shape == (2, 5, 32)
    moved = jax.tree.map(lambda x: x, params)
    moved["prompt"]["embedding"] = params["prompt"]["embedding"].at[0].add(1.0)  # the first prompt vector only
    changed = model.apply({"params": moved}, ids)
    assert not np.isclose(np.asarray(changed), np.asarray(logits), atol=1e-5).all(axis=-1).any()  # every token
    plain, plain_params = _model(prompt_length=0)
    assert "prompt" not in plain_params and plain.apply({"params": plain_params}, ids).shape == (2, 5, 40)


def test_a_prompted_decoder_classifier_reads_the_last_real_token():
    model, params = _model(head="classification", num_labels=3)
    text = jnp.asarray([[5, 6, 7, 2]])
    logits = model.apply({"params": params}, text)
    assert logits.shape == (1, 3)
    np.testing.assert_allclose(model.apply({"params": params}, jnp.pad(text, ((0, 0), (0, 4)))), logits,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position, prefix_lm, scan", [("rope", False, False), ("learned", True, False),
                                                       ("rope", False, True)])
def test_cached_greedy_with_a_soft_prompt_equals_uncached_argmax(position, prefix_lm, scan):
    """Prompts padded on either side, prefilled in one pass or (causal) in chunks of 2, decode as argmax over
    full forward passes of each row alone; beams and sampling run with chunks as without; scanned layers too."""
    model, params = _model(position, scan)
    rows = [[5, 6, 7, 8, 9], [13, 14], [20, 21, 22, 23], []]
    right = np.array([r + [0] * (5 - len(r)) for r in rows])
    left = np.array([[0] * (5 - len(r)) + r for r in rows])
    steps = 6
    greedy = jax.jit(lambda p, x: greedy_decode(model, p, x, steps, EOS, prefix_lm=prefix_lm))
    ours = np.asarray(greedy(params, right))
    np.testing.assert_array_equal(np.asarray(greedy(params, left)), ours)
    assert_uncached_argmax(model, params, rows, ours, prefix_lm)
    assert len({tuple(r) for r in ours.tolist()}) > 1
    if prefix_lm:
        return
    for how in SEARCHES:
        run = lambda c: np.asarray(jax.jit(lambda p, x: generate(model, p, x, steps, EOS, c))(params, left))  # noqa: E731
        np.testing.assert_array_equal(run(dataclasses.replace(how, prefill_chunk=2)), run(how))


def test_the_soft_prompt_changes_what_is_decoded():
    model, params = _model()
    prompts = jnp.asarray([[5, 6, 7, 8, 9], [13, 14, 15, 0, 0], [20, 21, 22, 23, 0]])
    ours = np.asarray(greedy_decode(model, params, prompts, 6, EOS))
    params["prompt"]["embedding"] = params["prompt"]["embedding"] * 3.0
    assert (np.asarray(greedy_decode(model, params, prompts, 6, EOS)) != ours).any()


def _sft(**extra) -> config_lib.Config:
    updates = {"model.vocab_size": 64, "model.d_model": 32, "model.num_heads": 4, "model.num_kv_heads": 2,
               "model.d_ff": 64, "model.num_decoder_layers": 2, "model.max_length": 64, "model.dropout_rate": 0.0,
               "data.packing": False, "data.max_source_length": 8, "data.max_target_length": 8,
               "train.init_from": "", "train.batch_size": 8, "optimizer.warmup_steps": 0,
               "peft.method": "prompt", "peft.prompt_length": 4, "peft.learning_rate": 3e-2, **extra}
    return peft.resolve(config_lib.override(config_lib.load(ROOT / "configs" / "finetune_sft_mt.py"), updates))


def _sft_batch() -> dict[str, np.ndarray]:
    """Prompts of 3-5 tokens then a fixed response the model must learn, right-padded rows."""
    rng = np.random.default_rng(0)
    targets, prompt = np.zeros((8, 12), np.int32), np.zeros((8, 12), np.int32)
    for r in range(8):
        length = 3 + r % 3
        targets[r, :length + 4] = np.concatenate([rng.integers(5, 64, length), [7, 8, 9, EOS]])
        prompt[r, :length] = 1
    return {"targets": targets, "targets_prompt": prompt}


def test_sft_prompt_tuning_trains_only_the_prompt_keeps_no_moments_for_the_rest_and_lowers_the_loss():
    config = _sft()
    assert config.model.prompt_length == 4
    mesh = sharding.make_mesh((2, 2, 2))
    trainer = Trainer.build(config, mesh)
    report = trainer.parameter_report()
    assert report["trainable"] == 4 * 32
    assert 2 * 4 * report["trainable"] <= report["optimizer_state_bytes"] <= 2 * 4 * report["trainable"] + 256
    state = trainer.init_state()
    initial = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    losses = []
    with trainer.context():
        step = trainer.jit_train_step()
        for _ in range(8):
            state, metrics = step(state, to_global_batch(_sft_batch(), mesh))
            losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
    final = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    for path, before in initial.items():
        if re.fullmatch(r"prompt/.*", path):
            assert not np.array_equal(before, final[path])
        else:
            np.testing.assert_array_equal(before, final[path], err_msg=f"{path} moved")
    assert losses[-1] < losses[0] - 0.1, losses


def test_decoder_prompt_tuning_is_accepted_and_packed_rows_are_still_refused():
    config_lib.validate(_sft())
    config_lib.validate(peft.resolve(tiny_config(task="causal_lm", model__family="decoder", peft__method="prompt")))
    with pytest.raises(UserError, match="set --config.data.packing=false"):
        _sft(**{"data.packing": True})
