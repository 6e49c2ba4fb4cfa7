"""Run configuration: frozen dataclasses, config files, strict overrides, validation."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosswrite_jax.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the Transformer; the only config a model sees.

    The defaults are the quickstart's encoder-decoder; BERT-, T5- and Llama-style models are other
    settings of the same switches (see crosswrite_jax/models/presets.py).
    """

    family: str = "encoder_decoder"  # encoder_decoder | encoder (BERT-style) | decoder (Llama-style)
    vocab_size: int = 8000
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: num_heads; fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 1024
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    activation: str = "relu"  # relu | gelu (erf) | gelu_tanh | silu
    gated_mlp: bool = False  # GLU feed-forward: act(wi_0 x) * wi_1 x (T5 v1.1, Llama)
    use_bias: bool = False  # biases on every projection (BERT)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post (BERT)
    norm_epsilon: float = 1e-6
    embedding_norm: bool = False  # a norm right after the embeddings (BERT)
    position: str = "sinusoidal"  # sinusoidal | learned | relative (T5 buckets) | rope
    max_length: int = 256  # longest sequence the position table covers
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    # RoPE frequency scaling: default (none) | llama3 (Llama 3.1+: low frequencies divided by rope_factor, high ones
    # kept, a smooth ramp between, set by the two factors and the pretraining context rope_original_max_length)
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_length: int = 8192
    scale_attention: bool = True  # softmax(q k / sqrt(head_dim)); T5 folds the scale into its weights
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings (BERT)
    pooler: bool = False  # encoder: dense + tanh over the first token (BERT's pooler)
    pooling: str = "first"  # what the pooler reads: first (BERT's [CLS]) | mean (over non-pad tokens: T5 encoders)
    # encoder: none (hidden states) | mlm | classification | token_classification; decoder: none | classification
    head: str = "none"
    num_labels: int = 2  # classes of the classification heads
    dropout_rate: float = 0.1
    tie_output_embedding: bool = True
    scale_tied_output: bool = True  # multiply by d_model**-0.5 before a tied output projection (T5)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16; params stay float32
    remat: str = "none"  # rematerialise each block in the backward pass: none | full | dots | dots_no_batch
    # Run each layer stack as one nn.scan over stacked parameters ([layers, ...] under '<stack>/layers/...', logical
    # axis 'layers', never sharded) instead of a Python loop over '<stack>/layer_<i>': compile time and program size
    # stop growing with depth. Checkpoints of one layout do not restore into the other.
    scan_layers: bool = False
    # Attention kernel: xla (any device) | cudnn (cuDNN's fused flash attention: NVIDIA GPUs, bfloat16 compute,
    # head_dim a multiple of 8 up to 256; causal self-attention skips the blocks above the diagonal).
    attention_kernel: str = "xla"
    # Parameter-efficient additions (set from the `peft` section by crosswrite_jax.peft.resolve):
    lora_rank: int = 0  # > 0: low-rank adapters B·A beside the Dense layers lora_targets names
    lora_alpha: float = 16.0  # adapter output scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on an adapter's input while training
    lora_targets: str = ".*/(query|key|value|out)"  # regex over module paths, e.g. 'encoder/layer_0/mlp/wi'
    prompt_length: int = 0  # > 0: learned soft-prompt vectors before the encoder or decoder-only input
    # MLM head: project only the first N masked positions of each row (BERT's max_predictions_per_seq), not every
    # position; 0: every position. About 2x the expected count keeps the loss exact in practice.
    mlm_max_predictions: int = 0


SCANNED_LAYERS = "layers"  # with model.scan_layers: the stacked layers' module name and logical axis name


@dataclass(frozen=True)
class DataConfig:
    """Where pairs come from and how they become batches."""

    dataset: str = "multi30k_sample"  # the bundled sample, or a directory of {split}.{lang}[.gz]
    source_lang: str = "en"
    target_lang: str = "de"
    train_split: str = "train"
    eval_split: str = "val"  # periodic validation during training
    max_source_length: int = 64  # with packing: the packed row length
    max_target_length: int = 64
    packing: bool = False  # several pairs per row (train.batch_size then counts rows); one compiled shape
    # Packed classification / tagging: the most examples one row holds (a classifier's outputs per row); 0: half
    # the row length, which binds only on one-token examples
    max_segments_per_row: int = 0
    bucket_lengths: tuple[int, ...] = (16, 32, 48, 64)  # without packing: batches pad to the smallest that fits
    length_grouping_window: int = 16  # batches sorted together by length; 1 disables grouping
    tokenizer: str = ""  # existing tokenizer directory; empty: train one on the training text
    tokenizer_model: str = "bpe"  # bpe | unigram | wordpiece
    # More text for a new vocabulary to learn from, besides the training text: e.g. the German side of a later
    # translation task, so that pretraining on English text leaves a vocabulary that also covers German.
    tokenizer_sources: tuple[str, ...] = ()
    # Pretraining text (tasks mlm, span_corruption, denoising, causal_lm, prefix_lm); crosswrite_jax/data/sources.py:
    # "text:GLOB", "text:GLOB?document=file", "tsv:GLOB?column=0", "csv:GLOB?column=text", "jsonl:GLOB?field=text",
    # "conll:GLOB?column=0", "tfds:NAME?split=train&field=text&data_dir=gs://BUCKET/tfds".
    sources: tuple[str, ...] = ()
    mixture_weights: tuple[float, ...] = ()  # sampling weight of each source; empty: equal
    eval_sources: tuple[str, ...] = ()  # held-out text for validation loss / perplexity
    data_dir: str = ""  # root for relative source paths; empty: $CROSSWRITE_DATA, else the working directory
    # Labeled examples of the fine-tuning tasks, a source spec with a {split} placeholder, e.g.
    # "tsv:sst2/{split}.tsv?text=0&label=1", "conll:ner/wnut17/{split}.conll?tokens=0&tags=-1",
    # "jsonl:summarization/scitldr/{split}.jsonl?source=source&target=target" (see crosswrite_jax/data/labeled.py).
    examples: str = ""
    labels: tuple[str, ...] = ()  # classes or tags, in id order; empty: found in the training split
    max_train_examples: int = 0  # > 0: train on N examples (pairs) of the training split only: the first N, or
    # with train_subset_seed >= 0 N drawn at random with that seed (the same N for every model and learning rate)
    train_subset_seed: int = -1
    # Task sft: the prompt a decoder reads before writing the target, with the pair's source in place of {source}
    prompt_template: str = "{source}\n"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW or Adafactor, schedule, clipping and which parameters are frozen."""

    # adamw | adafactor (optax.adafactor as T5X trains T5: factored second moments, relative step size by the
    # parameter's scale, update clipping at 1, no momentum; b1, b2 and eps are AdamW's and unused then)
    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | rsqrt | constant
    warmup_steps: int = 100
    end_learning_rate_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-9
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0  # 0 disables clipping
    freeze: tuple[str, ...] = ()  # path regexes, e.g. ("encoder/.*",)


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, batch, seed, validation and logging cadence."""

    steps: int = 1000
    batch_size: int = 64  # global, in sentence pairs
    seed: int = 0
    label_smoothing: float = 0.1
    eval_every: int = 500  # 0 disables periodic validation
    eval_batches: int = 4  # validation batches per periodic evaluation
    log_every: int = 50
    progress_bar: bool = True
    max_nonfinite_steps: int = 10  # consecutive skipped (non-finite) steps before the run stops
    init_from: str = ""  # a run directory (or checkpoint) whose params start a new run, e.g. from import-hf
    init_exclude: tuple[str, ...] = ()  # path regexes of params not taken from init_from (new heads): fresh init
    eval_at_start: bool = False  # validate before the first step of a fresh run (held-out loss before training)
    grad_accum_steps: int = 1  # > 1: the batch runs as this many microbatches (a scan), gradients summed
    # > 0: the output projection and cross-entropy run over this many target positions at a time (a scan that also
    # takes each chunk's gradients), so [batch, length, vocab] logits never exist at once. Decoder tasks and mlm
    # (over its predicted positions). Each chunk adds into a head-sized gradient: on accelerators, a few large
    # chunks (e.g. length / 8); on CPU, 8-16 positions keep a chunk's logits in cache.
    logits_chunk_length: int = 0
    profile_steps: int = 0  # > 0: a jax.profiler trace of this many steps after the first into WORKDIR/profile
    # validation metric whose best value keeps a checkpoint in WORKDIR/best, e.g. accuracy, f1, loss
    best_metric: str = ""
    early_stopping_patience: int = 0  # > 0: stop after this many validations without a new best_metric
    eval_decode_examples: int = 0  # translation / summarization: validation also decodes and scores this many
    # JAX PRNG of the dropout masks. threefry4x32 draws the same masks on any mesh, like JAX's default threefry2x32,
    # and dropout costs the SST-2 step 71 ms with it instead of 160 (docs/PERFORMANCE.md); rbg / unsafe_rbg are
    # XLA's generator (for TPU; JAX does not promise them the same masks on another mesh). Runs started before this
    # key existed drew threefry2x32 masks.
    dropout_rng: str = "threefry4x32"


@dataclass(frozen=True)
class ObjectiveConfig:
    """Self-supervised corruption settings of the pretraining tasks."""

    mlm_probability: float = 0.15  # share of tokens the MLM task predicts
    mask_token_rate: float = 0.8  # of those: replaced by the mask token
    random_token_rate: float = 0.1  # of those: replaced by a random token (the rest stay as they are)
    noise_density: float = 0.15  # span corruption and denoising: share of tokens inside noise spans
    mean_noise_span_length: float = 3.0
    prefix_fraction: float = 0.5  # prefix LM: the prefix is a uniform share in [0, 2 * this] of each example, capped


@dataclass(frozen=True)
class DecodeConfig:
    """How eval and predict generate: greedy (beam_size 1), beam search, or sampling."""

    beam_size: int = 1
    length_penalty: float = 1.0  # beam scores are log-probs / length ** length_penalty
    sample: bool = False  # sample instead of search
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0
    # > 0: a decoder-only model's prompts are prefilled into the cache this many tokens at a time, so a long
    # prompt's activations and attention scores exist one chunk at a time; 0: in one pass. Not for prefix LMs.
    prefill_chunk: int = 0


@dataclass(frozen=True)
class PeftConfig:
    """Which parameters fine-tuning trains: all, a frozen preset, LoRA adapters, biases (BitFit) or a soft prompt."""

    method: str = "full"  # full | freeze | lora | bitfit | prompt
    freeze: str = "all_but_head"  # method freeze: embeddings | encoder | all_but_head
    train_head: bool = True  # an encoder's task heads (classifier, pooler) train under every method
    train_pooler: bool = True  # with train_head, the pooler too (BERT checkpoints bring a pretrained one: it may stay)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ".*/(query|key|value|out)"  # add '|.*/mlp/(wi|wi_0|wi_1|wo)' for the MLPs
    prompt_length: int = 20
    learning_rate: float = 0.0  # > 0: replaces optimizer.learning_rate when method is not full (adapters like more)


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing cadence and retention."""

    every: int = 500  # steps between saves; the last step is always saved
    max_to_keep: int = 2
    async_save: bool = True


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh over (data, fsdp, tensor) and the sharding rules preset."""

    shape: tuple[int, ...] = (-1, 1, 1)  # one entry may be -1: the remaining devices
    rules: str = "fsdp"  # data_parallel | fsdp | tensor_parallel | fsdp_tp
    dcn_shape: tuple[int, ...] = (1, 1, 1)  # multi-slice: slices along (data, fsdp, tensor); shape is per slice


@dataclass(frozen=True)
class DistributedConfig:
    """The JAX multi-controller runtime: one process per host, all running the same command."""

    coordinator_address: str = ""  # host:port of process 0; empty: auto-detect (Cloud TPU, SLURM) or one process
    num_processes: int = 0  # 0: auto-detect
    process_id: int = -1  # -1: auto-detect
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a process counts as dead and all stop


@dataclass(frozen=True)
class EvalConfig:
    """Decoding and scoring of a split."""

    split: str = "test"
    batch_size: int = 128
    max_decode_length: int = 64
    max_examples: int = 0  # 0: the whole split
    # Task sft: how generated responses are scored: sacrebleu (BLEU and chrF) | rouge (ROUGE-1/2/L) | exact_match
    sft_metric: str = "sacrebleu"


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = "run"
    # translation | summarization | classification | tagging | mlm | span_corruption | denoising | causal_lm |
    # prefix_lm | sft
    task: str = "translation"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


PREFIX_LM_PREFILL_CHUNK = ("config key 'decode.prefill_chunk' splits a causal prompt, but a prefix LM's prompt "
                           "attends both ways and needs one pass; set --config.decode.prefill_chunk=0")
DROPOUT_RNGS = ("threefry2x32", "threefry4x32", "rbg", "unsafe_rbg")  # JAX PRNGs train.dropout_rng takes

_CHOICES = {
    "model.family": ("encoder_decoder", "encoder", "decoder"),
    "model.activation": ("relu", "gelu", "gelu_tanh", "silu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "model.position": ("sinusoidal", "learned", "relative", "rope"),
    "model.rope_type": ("default", "llama3"),
    "model.head": ("none", "mlm", "classification", "token_classification"),
    "model.pooling": ("first", "mean"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention_kernel": ("xla", "cudnn"),
    "task": ("translation", "summarization", "classification", "tagging", "mlm", "span_corruption", "denoising",
             "causal_lm", "prefix_lm", "sft"),
    "eval.sft_metric": ("sacrebleu", "rouge", "exact_match"),
    "peft.method": ("full", "freeze", "lora", "bitfit", "prompt"),
    "peft.freeze": ("embeddings", "encoder", "all_but_head"),
    "data.tokenizer_model": ("bpe", "unigram", "wordpiece"),
    "optimizer.name": ("adamw", "adafactor"),
    "optimizer.schedule": ("cosine", "linear", "rsqrt", "constant"),
    "mesh.rules": ("data_parallel", "fsdp", "tensor_parallel", "fsdp_tp"),
    "train.dropout_rng": DROPOUT_RNGS,
}


def all_keys(config: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config (of the base config if none is given)."""
    config = Config() if config is None else config
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, config: Config) -> UserError:
    close = difflib.get_close_matches(key, all_keys(config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with a key listed by `crosswrite keys`"
    return UserError(f"unknown config key '{key}'{hint}")


def _field_type(obj: Any, name: str) -> Any:
    return typing.get_type_hints(type(obj))[name]


def _parse_text(key: str, text: str, annotation: Any) -> Any:
    """A command-line string as the field's type."""
    if typing.get_origin(annotation) is tuple:
        text = text.strip()
        if text in ("", "()"):
            return ()
        try:
            value = ast.literal_eval(text if text.startswith(("(", "[")) else f"({text},)")
        except (ValueError, SyntaxError):  # bare words: 'encoder/.*,embed/.*'
            value = tuple(part.strip() for part in text.strip("()[]").split(",") if part.strip())
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if annotation is bool and text.lower() in ("true", "1", "yes", "false", "0", "no"):
        return text.lower() in ("true", "1", "yes")
    parse = {int: int, float: float}.get(annotation)
    if parse is not None:
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _check(key: str, value: Any, annotation: Any) -> Any:
    """The value if it has the field's type (ints widen to floats, lists to tuples); else a UserError."""
    if typing.get_origin(annotation) is tuple and isinstance(value, (tuple, list)):
        item_type = typing.get_args(annotation)[0]
        return tuple(_check(key, item, item_type) for item in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, annotation if typing.get_origin(annotation) is None else tuple) and not (
            annotation is int and isinstance(value, bool)):
        return value
    type_name = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"config key '{key}' wants {type_name}, got {value!r}")


def override(config: Config, updates: dict[str, Any]) -> Config:
    """Returns the config with dotted keys replaced, e.g. {'optimizer.learning_rate': 3e-4}."""
    for key, value in updates.items():
        parts = key.split(".")
        config = _replace_path(config, parts, value, key, config)
    validate(config)
    return config


def _replace_path(obj: Any, parts: list[str], value: Any, key: str, root: Config) -> Any:
    name = parts[0]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown_key(key, root)
    current = getattr(obj, name)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            raise _unknown_key(key, root)
        annotation = _field_type(obj, name)
        if isinstance(value, str) and annotation is not str:
            value = _parse_text(key, value, annotation)
        return dataclasses.replace(obj, **{name: _check(key, value, annotation)})
    return dataclasses.replace(obj, **{name: _replace_path(current, parts[1:], value, key, root)})


def validate(config: Config) -> None:
    """Checks types, choices and ranges; raises UserError naming the key."""
    _check_types(config, "")
    for key, choices in _CHOICES.items():
        value = get(config, key)
        if value not in choices:
            raise UserError(f"config key '{key}' is {value!r}; choose one of {', '.join(choices)}")
    for check in (_check_model, _check_sizes, _check_train, _check_mesh, _check_data, _check_objective,
                  _check_decode, _check_peft):
        check(config)


def _check_model(config: Config) -> None:
    """Heads, kernels and the Llama 3 RoPE settings."""
    m = config.model
    if m.head != "none" and m.family != "encoder" and (m.family, m.head) != ("decoder", "classification"):
        raise UserError(f"config key 'model.head' is '{m.head}', a head model.family '{m.family}' does not have; "
                        f"use 'none'{' or classification' if m.family == 'decoder' else ''}, or model.family=encoder")
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise UserError("config key 'model.num_heads' must divide 'model.d_model' (or set 'model.head_dim')")
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise UserError(f"config key 'model.num_kv_heads' ({m.num_kv_heads}) must divide model.num_heads "
                        f"({m.num_heads})")
    if m.attention_kernel == "cudnn":
        if m.dtype != "bfloat16":
            raise UserError("config key 'model.attention_kernel' is 'cudnn', whose fused attention has no float32 "
                            "kernel; set --config.model.dtype=bfloat16 (or model.attention_kernel=xla)")
        dim = m.head_dim or m.d_model // m.num_heads
        if dim % 8 or dim > 256:
            raise UserError(f"config key 'model.attention_kernel' is 'cudnn', which needs a head dimension that is a "
                            f"multiple of 8 up to 256, but it is {dim}; set model.head_dim or "
                            f"model.attention_kernel=xla")
    if m.rope_factor <= 0 or m.rope_low_freq_factor <= 0 or m.rope_high_freq_factor <= m.rope_low_freq_factor \
            or m.rope_original_max_length <= 0:
        raise UserError("config keys 'model.rope_*': rope_factor, rope_low_freq_factor and rope_original_max_length "
                        "must be positive and rope_high_freq_factor above rope_low_freq_factor")
    if m.mlm_max_predictions < 0 or (m.mlm_max_predictions and m.head != "mlm"):
        raise UserError(f"config key 'model.mlm_max_predictions' ({m.mlm_max_predictions}) must be >= 0 and is for "
                        f"model.head=mlm (it is '{m.head}'); set it to 0")


def _check_sizes(config: Config) -> None:
    """Sizes and counts that must be positive."""
    positive = ["model.vocab_size", "model.d_model", "model.num_heads", "model.d_ff", "train.steps",
                "train.batch_size", "train.log_every", "train.max_nonfinite_steps", "eval.batch_size",
                "eval.max_decode_length", "checkpoint.every",
                "checkpoint.max_to_keep", "data.max_source_length", "data.max_target_length"]
    for key in positive:
        if get(config, key) <= 0:
            raise UserError(f"config key '{key}' must be positive, got {get(config, key)}")


def _check_train(config: Config) -> None:
    """Accumulation, chunking, profiling and early stopping."""
    accum = config.train.grad_accum_steps
    if accum < 1 or config.train.batch_size % accum:
        raise UserError(f"config key 'train.grad_accum_steps' ({accum}) must be >= 1 and divide train.batch_size "
                        f"({config.train.batch_size})")
    if config.train.logits_chunk_length < 0:
        raise UserError(f"config key 'train.logits_chunk_length' must be >= 0, got {config.train.logits_chunk_length}")
    if config.train.profile_steps < 0:
        raise UserError(f"config key 'train.profile_steps' must be >= 0, got {config.train.profile_steps}")
    if config.train.early_stopping_patience < 0:
        raise UserError(f"config key 'train.early_stopping_patience' must be >= 0, got "
                        f"{config.train.early_stopping_patience}")
    if config.train.early_stopping_patience and not config.train.best_metric:
        raise UserError("config key 'train.early_stopping_patience' needs train.best_metric (e.g. accuracy, f1, loss)")


def _check_mesh(config: Config) -> None:
    """The mesh and its multi-slice shape."""
    if sum(1 for s in config.mesh.shape if s == -1) > 1 or any(s == 0 or s < -1 for s in config.mesh.shape):
        raise UserError(f"config key 'mesh.shape' {config.mesh.shape}: sizes must be positive, one may be -1")
    if len(config.mesh.shape) != 3:
        raise UserError(f"config key 'mesh.shape' needs 3 sizes (data, fsdp, tensor), got {config.mesh.shape}")
    dcn = config.mesh.dcn_shape
    if len(dcn) != 3 or sum(1 for s in dcn if s == -1) > 1 or any(s == 0 or s < -1 for s in dcn):
        raise UserError(f"config key 'mesh.dcn_shape' {dcn}: needs 3 positive sizes (slices along data, fsdp, "
                        f"tensor), one may be -1")


def _check_data(config: Config) -> None:
    """Buckets and lengths against the model, dropout, mixture weights."""
    m = config.model
    if not config.data.bucket_lengths or list(config.data.bucket_lengths) != sorted(config.data.bucket_lengths):
        raise UserError("config key 'data.bucket_lengths' must be a non-empty increasing tuple")
    for key in ("data.max_source_length", "data.max_target_length", "eval.max_decode_length"):
        if get(config, key) > m.max_length:
            raise UserError(f"config key '{key}' is {get(config, key)} but the model's positions end at "
                            f"model.max_length={m.max_length}; lower it or raise model.max_length")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise UserError(f"config key 'model.dropout_rate' must be in [0, 1), got {m.dropout_rate}")
    if config.data.mixture_weights and (len(config.data.mixture_weights) != len(config.data.sources)
                                        or min(config.data.mixture_weights) <= 0):
        raise UserError(f"config key 'data.mixture_weights' needs one positive weight per data.sources entry "
                        f"({len(config.data.sources)}), got {config.data.mixture_weights}")
    if not 0 <= config.data.max_segments_per_row <= config.data.max_source_length:
        raise UserError(f"config key 'data.max_segments_per_row' must be in [0, data.max_source_length="
                        f"{config.data.max_source_length}] (0: half the row), got {config.data.max_segments_per_row}")
    _check_prompt_template(config.data.prompt_template)


def _check_prompt_template(template: str) -> None:
    """A prompt template holds {source} and no other placeholder."""
    try:
        template.format(source="")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise UserError(f"config key 'data.prompt_template' is {template!r}, which does not format ({error!r}); "
                        f"use {{source}} for the source text and double other braces: {{{{ }}}}") from None
    if "{source}" not in template.replace("{{", "").replace("}}", ""):
        raise UserError(f"config key 'data.prompt_template' is {template!r}; it must hold {{source}}, where the "
                        f"source text goes, e.g. 'Translate to German: {{source}}\\n'")


def _check_objective(config: Config) -> None:
    """Masking and span-corruption rates."""
    o = config.objective
    for key in ("objective.mlm_probability", "objective.noise_density", "objective.prefix_fraction"):
        if not 0.0 < get(config, key) < 1.0:
            raise UserError(f"config key '{key}' must be in (0, 1), got {get(config, key)}")
    if o.mask_token_rate < 0 or o.random_token_rate < 0 or o.mask_token_rate + o.random_token_rate > 1.0:
        raise UserError("config keys 'objective.mask_token_rate' and 'objective.random_token_rate' must be >= 0 "
                        f"and sum to at most 1, got {o.mask_token_rate} and {o.random_token_rate}")
    if o.mean_noise_span_length < 1.0:
        raise UserError(f"config key 'objective.mean_noise_span_length' must be >= 1, got {o.mean_noise_span_length}")


def _check_decode(config: Config) -> None:
    """Search, sampling and prefill settings."""
    dc = config.decode
    if dc.beam_size < 1 or dc.temperature <= 0 or dc.top_k < 0 or not 0.0 < dc.top_p <= 1.0:
        raise UserError(f"config keys 'decode.*': beam_size >= 1, temperature > 0, top_k >= 0 and top_p in (0, 1] "
                        f"are needed, got beam_size={dc.beam_size}, temperature={dc.temperature}, "
                        f"top_k={dc.top_k}, top_p={dc.top_p}")
    if dc.sample and dc.beam_size > 1:
        raise UserError("config keys 'decode.sample' and 'decode.beam_size' > 1 exclude each other; pick one")
    if dc.prefill_chunk < 0:
        raise UserError(f"config key 'decode.prefill_chunk' must be >= 0, got {dc.prefill_chunk}")


def _check_peft(config: Config) -> None:
    """LoRA and soft-prompt settings."""
    m, p = config.model, config.peft
    if p.lora_rank <= 0 or p.prompt_length <= 0 or m.lora_rank < 0 or m.prompt_length < 0:
        raise UserError(f"config keys 'peft.lora_rank' and 'peft.prompt_length' must be positive (and model.lora_rank, "
                        f"model.prompt_length >= 0), got {p.lora_rank}, {p.prompt_length}")
    if not 0.0 <= p.lora_dropout < 1.0 or not 0.0 <= m.lora_dropout < 1.0:
        raise UserError(f"config key 'peft.lora_dropout' must be in [0, 1), got {p.lora_dropout}")
    for key in ("peft.lora_targets", "model.lora_targets"):
        try:
            re.compile(get(config, key))
        except re.error as error:
            raise UserError(f"config key '{key}' is not a valid regex ({error})") from None
    if (m.prompt_length or p.method == "prompt") and config.data.packing:
        raise UserError("a soft prompt (peft.method prompt, model.prompt_length > 0) needs unpacked rows; set "
                        "--config.data.packing=false")


def _check_types(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{prefix}{f.name}.")
        else:
            _check(f"{prefix}{f.name}", value, _field_type(obj, f.name))


def get(config: Any, key: str) -> Any:
    """Value of a dotted key."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """A JSON-ready nested dict."""
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Rebuilds a Config from `to_dict` output, strictly."""
    flat = _flatten(data)
    try:
        return override(Config(), flat)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def call_recipe(path: str | Path, function: str, required: bool = False) -> Any:
    """What a python recipe's `function()` returns (get_config, get_sweep); None when the recipe has no such
    function and it is not `required`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"crosswrite_config_{path.stem}", path)
    module = types.ModuleType(spec.name)
    module.__file__ = str(path)
    sys.path.insert(0, str(path.parent.resolve()))  # a recipe may import shared pieces (and recipes) from its folder
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, function, None)):
            if not required:
                return None
            raise UserError(f"defines no {function}(); it must return a crosswrite_jax.config.Config")
        return getattr(module, function)()
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    except Exception as error:  # a broken config file is bad input, not a crash
        raise UserError(f"{path}: could not be loaded ({type(error).__name__}: {error})") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))


def load(path: str | Path) -> Config:
    """Loads a python config file whose `get_config()` returns a Config, or a run's saved config.json."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found; pass --config with a file under configs/")
    if path.suffix == ".json":  # a run's saved config.json: the whole resolved config, reused as it is
        return load_json(path)
    config = call_recipe(path, "get_config", required=True)
    if not isinstance(config, Config):
        raise UserError(f"{path}: get_config() returned {type(config).__name__}, not a Config")
    try:
        validate(config)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return config


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Parses ['--config.a.b=1', '--config.c', '2'] into {'a.b': '1', 'c': '2'}."""
    updates: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise UserError(f"unrecognized argument '{arg}'; overrides look like --config.train.steps=100")
        body = arg[len("--config."):]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise UserError(f"override '{arg}' has no value; write --config.{body}=VALUE")
        updates[key] = value
        i += 1
    return updates


def save_json(config: Config, path: str | Path) -> None:
    """Writes the resolved config as JSON, atomically: a reader (or a crash) sees the old file or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(to_dict(config), indent=2) + "\n")
    os.replace(partial, path)


def read_json_object(path: str | Path, what: str = "JSON config") -> dict[str, Any]:
    """A JSON file holding one object; unreadable, invalid or non-object content is one line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable {what} ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds {type(data).__name__}, not a JSON object")
    return data


def load_json(path: str | Path) -> Config:
    """Reads a config saved by `save_json`."""
    return from_dict(read_json_object(path, "config"), str(path))
