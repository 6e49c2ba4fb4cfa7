"""Hugging Face interop: parity with transformers' PyTorch models, round trips, safetensors only."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from crosswrite_jax.errors import UserError
from crosswrite_jax.models import hf
from crosswrite_jax.models.transformer import build_model, param_shapes

torch.manual_seed(0)
SMALL = dict(vocab_size=99)
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, **SMALL)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
HF_MODELS = {
    "bert": lambda: BertModel(BertConfig(**BERT)),
    "bert-mlm": lambda: BertForMaskedLM(BertConfig(**BERT)),
    "bert-classification": lambda: BertForSequenceClassification(BertConfig(num_labels=3, **BERT)),
    "bert-tagging": lambda: BertForTokenClassification(BertConfig(num_labels=5, **BERT)),
    "t5-v1.0": lambda: T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                                           relative_attention_num_buckets=8,
                                                           relative_attention_max_distance=20, **SMALL)),
    "t5-v1.1": lambda: T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                           num_decoder_layers=3, num_heads=4,
                                                           feed_forward_proj="gated-gelu",
                                                           tie_word_embeddings=False, **SMALL)),
    # This project's T5 v1.1 layout: tied and unscaled, so the final norm's d_model**-0.5 folds in and out.
    "t5-v1.1-tied": lambda: T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                                                num_heads=4, feed_forward_proj="gated-gelu",
                                                                tie_word_embeddings=True,
                                                                scale_decoder_outputs=False, **SMALL)),
    "llama-gqa": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64, **SMALL)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                       num_attention_heads=4, tie_word_embeddings=True,
                                                       rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 500.0}, **SMALL)),
    # Llama 3.1's scaling, with a pretraining context of 32 so that it bites at these short positions.
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                        num_attention_heads=4, rope_parameters=LLAMA3_ROPE, **SMALL)),
}


def _randomize(model):
    """Non-trivial values everywhere (HF initializes norms to ones and biases to zeros)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _import(directory):
    hf_config, tensors = hf.read_checkpoint(directory)
    kind, config = hf.config_from_hf(hf_config, tensors)
    config = config.__class__(**{**config.__dict__, "dropout_rate": 0.0})
    params = hf.params_from_hf(kind, config, tensors, param_shapes(config))
    return kind, config, params


BATCH = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 0, 0, 0, 0]], np.int64)
MASK = (BATCH != 0).astype(np.int64)


def _ours(config, params, decoder_ids=None):
    model = build_model(config)
    ids = BATCH.astype(np.int32)
    if config.family == "encoder":
        return np.asarray(model.apply({"params": params}, ids))
    if config.family == "decoder":
        return np.asarray(model.apply({"params": params}, ids, padding=MASK.astype(bool)))
    targets = np.asarray(decoder_ids, np.int32)  # logits predict these; the model shifts them right itself
    return np.asarray(model.apply({"params": params}, ids, targets))


def _theirs(kind, model):
    with torch.no_grad():
        ids, mask = torch.tensor(BATCH), torch.tensor(MASK)
        if kind == "bert":
            out = model(input_ids=ids, attention_mask=mask)
            return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy(), None
        if kind == "t5":
            targets = torch.tensor([[21, 22, 23, 24, 25, 1], [26, 27, 1, 0, 0, 0]])
            decoder_input = torch.nn.functional.pad(targets, (1, 0))[:, :-1]  # start token 0
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input)
            return out.logits.numpy(), targets.numpy()
        return model(input_ids=ids, attention_mask=mask).logits.numpy(), None


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_logits_match_transformers_and_round_trip(name, tmp_path):
    model = _randomize(HF_MODELS[name]())
    model.save_pretrained(tmp_path / "hf")
    kind, config, params = _import(tmp_path / "hf")
    expected, decoder_ids = _theirs(kind, model)
    ours = _ours(config, params, decoder_ids)
    real = MASK.astype(bool) if kind != "t5" else decoder_ids != 0
    if kind == "t5" or ours.ndim == 2:
        real = np.ones(ours.shape[:2], bool)  # every decoder position / every sequence-level output
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)

    hf.write_checkpoint(tmp_path / "out", hf.config_to_hf(kind, config), hf.params_to_hf(kind, config, params))
    _, _, again = _import(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):  # T5's query scale folds out and back in
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
    reloaded = type(model).from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_theirs(kind, reloaded)[0][real], expected[real], atol=1e-4, rtol=0)


def test_llama3_rope_scaling_changes_the_model_and_survives_export(tmp_path):
    """Importing a Llama 3 checkpoint without its scaling gives other logits: the field must be honoured."""
    model = _randomize(HF_MODELS["llama3-rope"]())
    model.save_pretrained(tmp_path / "hf")
    kind, config, params = _import(tmp_path / "hf")
    assert (config.rope_type, config.rope_factor, config.rope_original_max_length) == ("llama3", 8.0, 32)
    unscaled = config.__class__(**{**config.__dict__, "rope_type": "default"})
    assert np.abs(_ours(config, params) - _ours(unscaled, params)).max() > 1e-3
    assert hf.config_to_hf(kind, config)["rope_parameters"] == LLAMA3_ROPE


DEFAULT_CONFIGS = {"bert": lambda: BertConfig(**BERT).to_dict(), "t5": lambda: T5Config(d_model=32).to_dict(),
                   "llama": lambda: LlamaConfig(hidden_size=32, num_attention_heads=4).to_dict()}
REFUSED = [  # (architecture, changed fields, the word the one-line error names)
    ("bert", {"frobnicate": 1}, "frobnicate"),
    ("t5", {"frobnicate": 1}, "frobnicate"),
    ("llama", {"frobnicate": 1}, "frobnicate"),
    ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ("bert", {"is_decoder": True}, "is_decoder"),
    ("bert", {"add_cross_attention": True}, "add_cross_attention"),
    ("t5", {"is_decoder": True}, "is_decoder"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "beta_fast": 32}}, "beta_fast"),
    ("llama", {"rope_parameters": {k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}}, "factor"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}}, "factor"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
]


@pytest.mark.parametrize("kind", sorted(DEFAULT_CONFIGS))
def test_transformers_default_configs_import_without_refusal(kind):
    assert hf.config_from_hf(DEFAULT_CONFIGS[kind]())[0] == kind


def test_the_older_rope_scaling_field_is_read_like_rope_parameters():
    old = {**DEFAULT_CONFIGS["llama"](), "rope_theta": 5e5, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items()
                                                                              if k != "rope_theta"}}
    del old["rope_parameters"]
    config = hf.config_from_hf(old)[1]
    assert (config.rope_type, config.rope_theta, config.rope_factor) == ("llama3", 5e5, 8.0)


@pytest.mark.parametrize("kind,fields,named", REFUSED, ids=[f"{k}-{n}" for k, _, n in REFUSED])
def test_unknown_or_unsupported_config_fields_are_refused_by_name(kind, fields, named):
    with pytest.raises(UserError, match=named) as error:
        hf.config_from_hf({**DEFAULT_CONFIGS[kind](), **fields})
    assert "\n" not in str(error.value)


def _config_edit(**fields):
    def edit(directory):
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit


TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, **SMALL)
# Fields import-hf once neither honoured nor refused by name (found while checking issue 26): (HF model, an edit of
# its saved config.json, the field a refusal must name).
GAPS = {
    # An untied BERT MLM decoder: the import tied it to the embeddings, other logits; now refused.
    "bert-untied-mlm": (lambda: BertForMaskedLM(BertConfig(tie_word_embeddings=False, **BERT)), None,
                        "tie_word_embeddings"),
    # Was KeyError 'silu' (an internal error); now imported.
    "t5-gated-silu": (lambda: T5ForConditionalGeneration(T5Config(feed_forward_proj="gated-silu", **TINY_T5)), None,
                      "feed_forward_proj"),
    # transformers applies dense_act_fn over feed_forward_proj's activation; so does the import now.
    "t5-dense-act-fn": (lambda: T5ForConditionalGeneration(T5Config(**TINY_T5)), _config_edit(dense_act_fn="silu"),
                        "dense_act_fn"),
    # transformers 5 takes rope_scaling over rope_parameters; so does the import (and refuses linear scaling).
    "llama-rope-scaling-too": (HF_MODELS["llama-gqa"], _config_edit(rope_scaling={"rope_type": "linear",
                                                                                  "factor": 4.0}), "rope_scaling"),
    # Was refused by a missing MLP bias tensor; now by the field.
    "llama-attention-bias": (lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=37,
                                                                  num_hidden_layers=1, num_attention_heads=4,
                                                                  attention_bias=True, **SMALL)), None,
                             "attention_bias"),
}


@pytest.mark.parametrize("name", sorted(GAPS))
def test_every_config_field_is_honoured_or_refused_by_name(name, tmp_path):
    """The import gives transformers' logits, or a one-line refusal naming the field."""
    make, edit, field = GAPS[name]
    _randomize(make()).save_pretrained(tmp_path / "hf")
    if edit:
        edit(tmp_path / "hf")
    reloaded = type(make()).from_pretrained(tmp_path / "hf").eval()  # what transformers makes of the files
    try:
        kind, config, params = _import(tmp_path / "hf")
    except UserError as error:
        assert field in str(error) and "\n" not in str(error)
        return
    expected, decoder_ids = _theirs(kind, reloaded)
    ours = _ours(config, params, decoder_ids)
    real = MASK.astype(bool) if kind != "t5" else np.ones(ours.shape[:2], bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)


def test_unknown_missing_and_misshapen_tensors_are_named(tmp_path):
    model = _randomize(HF_MODELS["llama-gqa"]())
    model.save_pretrained(tmp_path / "hf")
    hf_config, tensors = hf.read_checkpoint(tmp_path / "hf")
    kind, config = hf.config_from_hf(hf_config)
    shapes = param_shapes(config)
    with pytest.raises(UserError, match="tensor 'model.extra.weight'.*no place"):
        hf.params_from_hf(kind, config, {**tensors, "model.extra.weight": np.zeros(3)}, shapes)
    with pytest.raises(UserError, match="tensor 'model.norm.weight' is missing"):
        hf.params_from_hf(kind, config, {k: v for k, v in tensors.items() if k != "model.norm.weight"}, shapes)
    bad = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.zeros((36, 32), np.float32)})
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' has shape \[36, 32\]"):
        hf.params_from_hf(kind, config, bad, shapes)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="pytorch_model.bin, a pickle, which is refused"):
        hf.read_checkpoint(tmp_path)


def test_sharded_safetensors_index_is_read(tmp_path):
    model = _randomize(HF_MODELS["bert"]())
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / hf.INDEX).is_file()
    _, config, params = _import(tmp_path / "hf")
    expected, _ = _theirs("bert", model)
    np.testing.assert_allclose(_ours(config, params)[MASK.astype(bool)], expected[MASK.astype(bool)], atol=1e-4)
