"""Hugging Face checkpoints to and from this project's parameters: BERT, T5 (v1.0 / v1.1) and Llama.

Reads and writes `config.json` + safetensors (sharded index too) with numpy only; PyTorch is not needed.
Every tensor is accounted for: an unknown or missing tensor, or a shape that disagrees with the config,
is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from crosswrite_jax.config import ModelConfig, read_json_object
from crosswrite_jax.errors import UserError
from crosswrite_jax.models import presets
from crosswrite_jax.models.layers import head_dim, relative_bias_multiplier
from crosswrite_jax.models.transformer import output_norm_multiplier, stack_layers, unstack_layers, unstacked_shapes

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"

# --------------------------------------------------------------------------------------------- configs


BERT_HEADS = {"BertModel": "none", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "classification",
              "BertForTokenClassification": "token_classification"}


# transformers' T5 activation names -> ours (the last name of each activation is the one export writes).
_T5_ACTIVATIONS = {"relu": "relu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
                   "swish": "silu", "silu": "silu"}


def config_from_hf(hf: dict[str, Any], tensor_names: Any = ()) -> tuple[str, ModelConfig]:
    """The architecture kind ('bert', 't5', 'llama') and the ModelConfig of a HF config.json dict."""
    kind = hf.get("model_type")
    if kind in _FIELDS:
        check_fields(kind, hf)
    if kind == "bert":
        architecture = (hf.get("architectures") or ["BertModel"])[0]
        if architecture not in BERT_HEADS:
            raise UserError(f"config.json names {architecture}; import-hf supports {', '.join(BERT_HEADS)}")
        head = BERT_HEADS[architecture]
        if head == "mlm" and hf.get("tie_word_embeddings", True) is False:
            raise UserError("config.json field 'tie_word_embeddings' is false; import-hf supports only BERT masked-LM "
                            "decoders tied to the word embeddings")
        has_pooler = any(name.removeprefix("bert.") == "pooler.dense.weight" for name in tensor_names)
        return kind, presets.bert(
            head=head, pooler=has_pooler or head == "classification", num_labels=len(hf.get("id2label") or "01"),
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], num_encoder_layers=hf["num_hidden_layers"],
            activation={"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[hf.get("hidden_act", "gelu")],
            norm_epsilon=hf.get("layer_norm_eps", 1e-12), max_length=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2), dropout_rate=hf.get("hidden_dropout_prob", 0.1))
    if kind == "t5":
        projection = hf.get("feed_forward_proj", "relu")
        gated = projection.startswith("gated-")
        # transformers applies dense_act_fn; without it, feed_forward_proj's (gated-gelu means the tanh GELU).
        act = hf.get("dense_act_fn") or ("gelu_new" if projection == "gated-gelu"
                                         else projection.removeprefix("gated-"))
        field = "dense_act_fn" if hf.get("dense_act_fn") else "feed_forward_proj"
        if act not in _T5_ACTIVATIONS:
            raise UserError(f"config.json field '{field}' gives activation {act!r}; import-hf supports "
                            f"{', '.join(sorted(_T5_ACTIVATIONS))} for t5 checkpoints")
        return kind, presets.t5(
            "1.1" if gated else "1.0", vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"],
            head_dim=hf["d_kv"], d_ff=hf["d_ff"], num_encoder_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            activation=_T5_ACTIVATIONS[act],
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            dropout_rate=hf.get("dropout_rate", 0.1), tie_output_embedding=hf.get("tie_word_embeddings", True),
            # T5 v1.0 scales decoder outputs by d_model**-0.5; v1.1 does not (transformers 5 records this as
            # scale_decoder_outputs, older configs as tie_word_embeddings=false with a separate lm_head).
            scale_tied_output=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))
    if kind == "llama":
        return kind, presets.llama(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or 0, head_dim=hf.get("head_dim") or 0,
            d_ff=hf["intermediate_size"], num_decoder_layers=hf["num_hidden_layers"],
            norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            max_length=hf.get("max_position_embeddings", 2048),
            tie_output_embedding=hf.get("tie_word_embeddings", False), **_llama_rope(hf))
    raise UserError(f"config.json has model_type {kind!r}; import-hf supports bert, t5 and llama")


def _llama_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE settings from transformers 5's `rope_parameters` or the older `rope_scaling` +
    `rope_theta`; a RoPE variant this project does not implement is refused."""
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"  # transformers takes rope_scaling first
    rope = dict(hf.get(source) or {})
    theta = float(rope.pop("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta",
                                                                                hf.get("rope_theta", 10000.0))))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"config.json: {source} 'partial_rotary_factor' below 1 is not supported by import-hf")
    rope.pop("partial_rotary_factor", None)
    if rope_type == "default":
        if rope:
            raise UserError(f"config.json: {source} field '{sorted(rope)[0]}' has no meaning for the default RoPE; "
                            f"remove it or give rope_type")
        return {"rope_theta": theta}
    if rope_type != "llama3":
        raise UserError(f"config.json: {source} rope_type '{rope_type}' is not supported by import-hf (default and "
                        f"llama3 are); such a checkpoint would import with wrong positions")
    names = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
             "high_freq_factor": "rope_high_freq_factor",
             "original_max_position_embeddings": "rope_original_max_length"}
    unknown = sorted(set(rope) - set(names))
    if unknown:
        raise UserError(f"config.json: {source} field '{unknown[0]}' is not one llama3 scaling uses; import-hf refuses "
                        f"it")
    missing = sorted(set(names) - set(rope))
    if missing:
        raise UserError(f"config.json: llama3 rope scaling needs '{missing[0]}'; add it to {source}")
    return {"rope_theta": theta, "rope_type": "llama3", **{ours: type(getattr(ModelConfig, ours))(rope[key])
                                                           for key, ours in names.items()}}


# Fields of a transformers config.json that do not change the converted model (bookkeeping, generation, training
# settings), per architecture besides the fields config_from_hf reads. Any other field is refused by name: it
# may change the outputs, and silently ignoring it would import a different model.
_BOOKKEEPING = {"_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
                "id2label", "label2id", "problem_type", "return_dict", "output_attentions", "output_hidden_states",
                "use_cache", "chunk_size_feed_forward", "is_encoder_decoder", "bos_token_id", "eos_token_id",
                "pad_token_id", "decoder_start_token_id", "sep_token_id", "initializer_range", "initializer_factor",
                "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "gradient_checkpointing",
                "output_past", "classifier_dropout", "tie_encoder_decoder", "max_length", "n_positions"}
_FIELDS = {
    "bert": {"vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
             "hidden_act", "layer_norm_eps", "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob",
             "attention_probs_dropout_prob", "tie_word_embeddings", "position_embedding_type", "is_decoder",
             "add_cross_attention"},
    "t5": {"vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
           "feed_forward_proj", "dense_act_fn", "is_gated_act", "layer_norm_epsilon", "relative_attention_num_buckets",
           "relative_attention_max_distance", "dropout_rate", "tie_word_embeddings", "scale_decoder_outputs",
           "is_decoder"},
    "llama": {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "num_hidden_layers", "attention_bias", "attention_dropout", "rms_norm_eps",
              "max_position_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "tie_word_embeddings",
              "hidden_act", "mlp_bias", "pretraining_tp"},
}
# Fields read or known whose other values this project's layers do not implement.
_ONLY = {"bert": {"position_embedding_type": ("absolute",), "is_decoder": (False,), "add_cross_attention": (False,),
                  "hidden_act": ("gelu", "gelu_new", "relu")},
         "t5": {"is_decoder": (False,)},
         "llama": {"hidden_act": ("silu",), "mlp_bias": (False,), "attention_bias": (False,)}}


def check_fields(kind: str, hf: dict[str, Any]) -> None:
    """Refuses, by name, a config.json field that import-hf would otherwise ignore or cannot honour."""
    for key in sorted(hf):
        if key not in _FIELDS[kind] and key not in _BOOKKEEPING:
            raise UserError(f"config.json field '{key}' is not one import-hf knows for {kind} checkpoints; it may "
                            f"change the model, so it is refused (remove it if it has no effect)")
        allowed = _ONLY[kind].get(key)
        if allowed is not None and hf[key] not in allowed:
            raise UserError(f"config.json field '{key}' is {hf[key]!r}; import-hf supports only "
                            f"{', '.join(repr(a) for a in allowed)} for {kind} checkpoints")


def config_to_hf(kind: str, c: ModelConfig) -> dict[str, Any]:
    """A transformers config dict for a model of this project."""
    from transformers import BertConfig, LlamaConfig, T5Config

    if kind == "bert":
        architecture = {head: name for name, head in BERT_HEADS.items()}[c.head]
        return BertConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.num_encoder_layers,
            num_attention_heads=c.num_heads, intermediate_size=c.d_ff,
            hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[c.activation],
            max_position_embeddings=c.max_length, type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_epsilon,
            hidden_dropout_prob=c.dropout_rate, architectures=[architecture],
            id2label={i: f"LABEL_{i}" for i in range(c.num_labels)}).to_dict()
    if kind == "t5":
        if not c.tie_output_embedding:
            raise UserError("transformers 5 always ties T5's output layer to its embeddings; export a model "
                            "trained with model.tie_output_embedding=true")
        act = {ours: theirs for theirs, ours in _T5_ACTIVATIONS.items()}[c.activation]
        hf = T5Config(
            vocab_size=c.vocab_size, d_model=c.d_model, d_kv=head_dim(c), d_ff=c.d_ff,
            num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
            relative_attention_num_buckets=c.relative_buckets, relative_attention_max_distance=c.relative_max_distance,
            layer_norm_epsilon=c.norm_epsilon, dropout_rate=c.dropout_rate,
            feed_forward_proj=f"gated-{act}" if c.gated_mlp else act, tie_word_embeddings=c.scale_tied_output,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            architectures=["T5ForConditionalGeneration"]).to_dict()
        hf["scale_decoder_outputs"] = c.scale_tied_output
        return hf
    if kind == "llama":
        return LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
            num_hidden_layers=c.num_decoder_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads or c.num_heads, head_dim=head_dim(c), rms_norm_eps=c.norm_epsilon,
            max_position_embeddings=c.max_length, tie_word_embeddings=c.tie_output_embedding,
            attention_bias=c.use_bias, rope_parameters=_rope_parameters(c),
            architectures=["LlamaForCausalLM"]).to_dict()
    raise UserError(f"no Hugging Face export for {kind!r}")


def _rope_parameters(c: ModelConfig) -> dict[str, Any]:
    if c.rope_type == "default":
        return {"rope_type": "default", "rope_theta": c.rope_theta}
    return {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": c.rope_factor,
            "low_freq_factor": c.rope_low_freq_factor, "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_max_length}


def kind_of(c: ModelConfig) -> str:
    """Which Hugging Face architecture a ModelConfig corresponds to."""
    if c.family == "encoder" and c.position == "learned" and c.norm_position == "post":
        return "bert"
    if c.family == "encoder_decoder" and c.position == "relative" and c.norm == "rmsnorm":
        return "t5"
    if c.family == "decoder" and c.position == "rope" and c.gated_mlp:
        return "llama"
    raise UserError(f"a {c.family} model with {c.position} positions has no Hugging Face counterpart here; "
                    f"export-hf supports BERT-, T5- and Llama-style configs")


# ------------------------------------------------------------------------------------ tensor layouts
# Each rule: our parameter path -> (HF tensor name, layout). Layouts convert HF (torch Linear: [out, in]) to
# this project's kernels ([in..., out...]) and back.


def _layouts(c: ModelConfig) -> dict[str, tuple[Callable, Callable]]:
    n, h, d = c.num_heads, head_dim(c), c.d_model
    k, m, r = c.num_kv_heads or n, output_norm_multiplier(c), relative_bias_multiplier(c)
    return {
        "same": (lambda w: w, lambda w: w),
        "linear": (lambda w: w.T, lambda w: w.T),
        "q": (lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T),
        # T5 folds the 1/sqrt(head_dim) score scale into its query; a model with scale_attention keeps it apart.
        "q_folded": (lambda w: w.T.reshape(d, n, h) * h ** 0.5, lambda w: (w / h ** 0.5).reshape(d, n * h).T),
        "kv": (lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
        "q_bias": (lambda b: b.reshape(n, h), lambda b: b.reshape(n * h)),
        "kv_bias": (lambda b: b.reshape(k, h), lambda b: b.reshape(k * h)),
        "out": (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
        # Before a tied, unscaled output the model keeps the final norm's d_model**-0.5 out of its stored gain.
        "output_norm": (lambda w: w / m, lambda w: w * m),
        # T5's relative-bias table is stored over a fixed factor (layers.relative_bias_multiplier).
        "relative_bias": (lambda w: w / r, lambda w: w * r),
    }


def _bert_rules(c: ModelConfig) -> dict[str, tuple[str, str]]:
    rules = {
        "embed/token_embed/embedding": ("embeddings.word_embeddings.weight", "same"),
        "embed/position_embed/embedding": ("embeddings.position_embeddings.weight", "same"),
        "embed/type_embed/embedding": ("embeddings.token_type_embeddings.weight", "same"),
        "embed/embed_norm/scale": ("embeddings.LayerNorm.weight", "same"),
        "embed/embed_norm/bias": ("embeddings.LayerNorm.bias", "same"),
    }
    for i in range(c.num_encoder_layers):
        ours, hf = f"encoder/layer_{i}", f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            layout = "q" if proj == "query" else "kv"
            rules[f"{ours}/self_attention/{proj}/kernel"] = (f"{hf}.attention.self.{proj}.weight", layout)
            rules[f"{ours}/self_attention/{proj}/bias"] = (f"{hf}.attention.self.{proj}.bias", f"{layout}_bias")
        rules.update({
            f"{ours}/self_attention/out/kernel": (f"{hf}.attention.output.dense.weight", "out"),
            f"{ours}/self_attention/out/bias": (f"{hf}.attention.output.dense.bias", "same"),
            f"{ours}/self_attention_norm/scale": (f"{hf}.attention.output.LayerNorm.weight", "same"),
            f"{ours}/self_attention_norm/bias": (f"{hf}.attention.output.LayerNorm.bias", "same"),
            f"{ours}/mlp/wi/kernel": (f"{hf}.intermediate.dense.weight", "linear"),
            f"{ours}/mlp/wi/bias": (f"{hf}.intermediate.dense.bias", "same"),
            f"{ours}/mlp/wo/kernel": (f"{hf}.output.dense.weight", "linear"),
            f"{ours}/mlp/wo/bias": (f"{hf}.output.dense.bias", "same"),
            f"{ours}/mlp_norm/scale": (f"{hf}.output.LayerNorm.weight", "same"),
            f"{ours}/mlp_norm/bias": (f"{hf}.output.LayerNorm.bias", "same"),
        })
    if c.pooler or c.head == "classification":
        rules.update({"pooler/kernel": ("pooler.dense.weight", "linear"), "pooler/bias": ("pooler.dense.bias", "same")})
    if c.head == "mlm":
        rules.update({"mlm_transform/kernel": ("cls.predictions.transform.dense.weight", "linear"),
                      "mlm_transform/bias": ("cls.predictions.transform.dense.bias", "same"),
                      "mlm_norm/scale": ("cls.predictions.transform.LayerNorm.weight", "same"),
                      "mlm_norm/bias": ("cls.predictions.transform.LayerNorm.bias", "same"),
                      "mlm_bias": ("cls.predictions.bias", "same")})
    if c.head in ("classification", "token_classification"):
        rules.update({"classifier/kernel": ("classifier.weight", "linear"),
                      "classifier/bias": ("classifier.bias", "same")})
    return rules


def _t5_rules(c: ModelConfig) -> dict[str, tuple[str, str]]:
    rules = {"embed/token_embed/embedding": ("shared.weight", "same"),
             "encoder/relative_attention_bias/embedding": (
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_bias"),
             "decoder/relative_attention_bias/embedding": (
                 "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_bias"),
             "encoder/final_norm/scale": ("encoder.final_layer_norm.weight", "same"),
             "decoder/final_norm/scale": ("decoder.final_layer_norm.weight", "output_norm")}
    if not c.tie_output_embedding:
        rules["output/kernel"] = ("lm_head.weight", "linear")
    mlp = ("wi_0", "wi_1", "wo") if c.gated_mlp else ("wi", "wo")
    query = "q_folded" if c.scale_attention else "q"
    for stack, layers in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
        for i in range(layers):
            ours, hf = f"{stack}/layer_{i}", f"{stack}.block.{i}.layer"
            attention = [("self_attention", f"{hf}.0.SelfAttention", f"{hf}.0.layer_norm")]
            if stack == "decoder":
                attention.append(("cross_attention", f"{hf}.1.EncDecAttention", f"{hf}.1.layer_norm"))
            for name, module, norm in attention:
                rules.update({f"{ours}/{name}/query/kernel": (f"{module}.q.weight", query),
                              f"{ours}/{name}/key/kernel": (f"{module}.k.weight", "kv"),
                              f"{ours}/{name}/value/kernel": (f"{module}.v.weight", "kv"),
                              f"{ours}/{name}/out/kernel": (f"{module}.o.weight", "out"),
                              f"{ours}/{name}_norm/scale": (f"{norm}.weight", "same")})
            ff = 2 if stack == "decoder" else 1
            for proj in mlp:
                rules[f"{ours}/mlp/{proj}/kernel"] = (f"{hf}.{ff}.DenseReluDense.{proj}.weight", "linear")
            rules[f"{ours}/mlp_norm/scale"] = (f"{hf}.{ff}.layer_norm.weight", "same")
    return rules


def _llama_rules(c: ModelConfig) -> dict[str, tuple[str, str]]:
    rules = {"embed/token_embed/embedding": ("model.embed_tokens.weight", "same"),
             "decoder/final_norm/scale": ("model.norm.weight", "output_norm")}
    if not c.tie_output_embedding:
        rules["output/kernel"] = ("lm_head.weight", "linear")
    for i in range(c.num_decoder_layers):
        ours, hf = f"decoder/layer_{i}", f"model.layers.{i}"
        rules.update({
            f"{ours}/self_attention/query/kernel": (f"{hf}.self_attn.q_proj.weight", "q"),
            f"{ours}/self_attention/key/kernel": (f"{hf}.self_attn.k_proj.weight", "kv"),
            f"{ours}/self_attention/value/kernel": (f"{hf}.self_attn.v_proj.weight", "kv"),
            f"{ours}/self_attention/out/kernel": (f"{hf}.self_attn.o_proj.weight", "out"),
            f"{ours}/self_attention_norm/scale": (f"{hf}.input_layernorm.weight", "same"),
            f"{ours}/mlp_norm/scale": (f"{hf}.post_attention_layernorm.weight", "same"),
            f"{ours}/mlp/wi_0/kernel": (f"{hf}.mlp.gate_proj.weight", "linear"),
            f"{ours}/mlp/wi_1/kernel": (f"{hf}.mlp.up_proj.weight", "linear"),
            f"{ours}/mlp/wo/kernel": (f"{hf}.mlp.down_proj.weight", "linear"),
        })
        if c.use_bias:
            for proj, layout in (("query", "q_bias"), ("key", "kv_bias"), ("value", "kv_bias")):
                short = {"query": "q", "key": "k", "value": "v"}[proj]
                rules[f"{ours}/self_attention/{proj}/bias"] = (f"{hf}.self_attn.{short}_proj.bias", layout)
            rules[f"{ours}/self_attention/out/bias"] = (f"{hf}.self_attn.o_proj.bias", "same")
    return rules


RULES = {"bert": _bert_rules, "t5": _t5_rules, "llama": _llama_rules}
# Tensors a HF checkpoint may carry that hold nothing new: tied copies and buffers.
_REDUNDANT = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embeddings.position_ids",
              "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

# ------------------------------------------------------------------------------------ conversion


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_from_hf(kind: str, config: ModelConfig, tensors: dict[str, np.ndarray],
                   expected_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Our parameter tree from HF tensors; every tensor used, every parameter found, every shape checked.

    With model.scan_layers, the per-layer tensors convert as for the unrolled model and are then stacked."""
    if config.scan_layers:
        unrolled = dataclasses.replace(config, scan_layers=False)
        return stack_layers(params_from_hf(kind, unrolled, tensors, unstacked_shapes(expected_shapes)))
    if kind == "bert":  # BertFor* checkpoints keep the encoder under "bert."
        tensors = {name.removeprefix("bert."): value for name, value in tensors.items()}
    rules, layouts = RULES[kind](config), _layouts(config)
    missing_ours = sorted(set(expected_shapes) - set(rules))
    if missing_ours:
        raise UserError(f"no Hugging Face tensor maps to parameter '{missing_ours[0]}'; this config is not a "
                        f"{kind} layout")
    params: dict = {}
    used = set()
    for path, (name, layout) in rules.items():
        if name not in tensors:
            raise UserError(f"tensor '{name}' is missing from the checkpoint (needed for {path})")
        value = layouts[layout][0](np.asarray(tensors[name], np.float32))
        if tuple(value.shape) != tuple(expected_shapes[path]):
            raise UserError(f"tensor '{name}' has shape {list(tensors[name].shape)}, which does not fit "
                            f"{path} {list(expected_shapes[path])} under the checkpoint's config.json")
        _set(params, path, value)
        used.add(name)
    tied_head = "lm_head.weight"
    if config.tie_output_embedding and tied_head in tensors and tied_head not in used:
        embedding = tensors[rules["embed/token_embed/embedding"][0]]
        if not np.array_equal(np.asarray(tensors[tied_head]), np.asarray(embedding)):
            raise UserError(f"tensor '{tied_head}' differs from the token embeddings, but config.json ties them")
        used.add(tied_head)
    unknown = sorted(set(tensors) - used - set(_REDUNDANT))
    if unknown:
        raise UserError(f"tensor '{unknown[0]}' in the checkpoint has no place in a {kind} model "
                        f"({len(unknown)} unknown tensors); only BertModel, T5ForConditionalGeneration and "
                        f"LlamaForCausalLM weights are converted")
    return params


def params_to_hf(kind: str, config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF tensors (float32, contiguous) from our parameter tree (stacked layers are unstacked)."""
    if config.scan_layers:
        params, config = unstack_layers(params), dataclasses.replace(config, scan_layers=False)
    rules, layouts = RULES[kind](config), _layouts(config)
    flat = _flatten(params)
    out = {name: np.ascontiguousarray(layouts[layout][1](np.asarray(flat[path], np.float32)))
           for path, (name, layout) in rules.items()}
    if kind == "llama" and config.tie_output_embedding:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    if kind == "bert" and config.head != "none":  # BertFor* keep the encoder under "bert."
        heads = ("cls.", "classifier.")
        out = {(name if name.startswith(heads) else f"bert.{name}"): value for name, value in out.items()}
    return out


# ------------------------------------------------------------------------------------ files


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json and every tensor of a HF model directory (safetensors only, sharded index too)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"'{directory}' has no config.json; pass a Hugging Face model directory")
    hf_config = read_json_object(config_path)
    if (directory / INDEX).is_file():
        weight_map = read_json_object(directory / INDEX, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{directory / INDEX}: has no 'weight_map' object; copy it again from its source")
        files = sorted(set(weight_map.values()))
    elif (directory / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        why = f"it holds {pickled[0]}, a pickle, which is refused: convert it to safetensors first" if pickled else \
            "no model.safetensors or model.safetensors.index.json"
        raise UserError(f"'{directory}': {why}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(_load_safetensors(directory / name))
    return hf_config, tensors


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """One safetensors file's tensors; a missing, truncated or corrupt file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error}); copy it again from its source") from None


def write_checkpoint(directory: str | Path, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """config.json + model.safetensors that transformers' from_pretrained loads."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shared: dict[int, str] = {}
    unique = {}
    for name, value in tensors.items():  # safetensors refuses aliased buffers: copy ties
        unique[name] = value.copy() if id(value) in shared else value
        shared[id(value)] = name
    save_file(unique, str(directory / SAFETENSORS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
