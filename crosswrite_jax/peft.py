"""Parameter-efficient fine-tuning: which parameters train, and LoRA merging (the commands: `adapters`).

One mechanism decides what trains: every parameter path gets a label, and frozen labels go to
`optax.set_to_zero()` (no update, no optimizer moments). The methods are label rules:

- full: everything; freeze: a preset (embeddings, encoder, all_but_head) is frozen;
- lora: only `lora_a` / `lora_b` adapters (Hu et al., 2021); bitfit: only biases and norm parameters
  (Ben Zaken et al., 2022); prompt: only the soft prompt (Lester et al., 2021);
- with `peft.train_head`, an encoder's task heads (classifier, pooler) train under every method; with
  `peft.train_pooler=false`, the pooler (pretrained in BERT checkpoints) stays frozen.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from flax import traverse_util

from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError

# Task heads: new on a pretrained encoder, so they train under every method (with peft.train_head). The output
# projection of generating models is pretrained like the rest and follows the method (LoRA leaves it frozen).
HEADS = {"encoder": r"(classifier|pooler|mlm_transform|mlm_norm)/.*|mlm_bias",
         "encoder_decoder": r"(?!)", "decoder": r"classifier/.*"}
METHOD_PARAMS = {"lora": r"(.*/)?lora_[ab]", "bitfit": r".*/bias|(.*/)?[^/]*norm[^/]*/scale",
                 "prompt": r"prompt/.*"}
FROZEN_PRESETS = {"embeddings": r"embed/.*", "encoder": r"(embed|encoder|prompt)/.*"}
ADDED = r"(.*/)?lora_[ab]|prompt/.*"  # parameters PEFT adds: absent from a base checkpoint, freshly initialised


def resolve(config: Config) -> Config:
    """The config with the model additions its peft.method needs (LoRA adapters, soft prompt) switched on."""
    p, model = config.peft, config.model
    if p.method == "lora" and not model.lora_rank:
        model = dataclasses.replace(model, lora_rank=p.lora_rank, lora_alpha=p.lora_alpha,
                                    lora_dropout=p.lora_dropout, lora_targets=p.lora_targets)
    if p.method == "prompt" and not model.prompt_length:
        model = dataclasses.replace(model, prompt_length=p.prompt_length)
    optimizer = config.optimizer
    if p.method != "full" and p.learning_rate > 0:
        optimizer = dataclasses.replace(optimizer, learning_rate=p.learning_rate)
    return dataclasses.replace(config, model=model, optimizer=optimizer)


def trainable_rule(config: Config) -> Callable[[str], bool]:
    """path -> whether that parameter trains under config.peft."""
    p = config.peft
    head = re.compile(HEADS[config.model.family])

    def is_head(path: str) -> bool:
        if not p.train_pooler and path.startswith("pooler/"):
            return False
        return p.train_head and head.fullmatch(path) is not None

    if p.method == "full":
        return lambda path: True
    if p.method == "freeze":
        if p.freeze == "all_but_head":
            return is_head
        frozen = re.compile(FROZEN_PRESETS[p.freeze])
        return lambda path: frozen.fullmatch(path) is None
    method = re.compile(METHOD_PARAMS[p.method])
    return lambda path: is_head(path) or method.fullmatch(path) is not None


def check_trainable(config: Config, paths: list[str], rule: Callable[[str], bool]) -> None:
    """Fails when a method would train nothing (e.g. lora with targets that match no layer)."""
    if config.peft.method == "full":
        return
    added = [p for p in paths if re.fullmatch(METHOD_PARAMS.get(config.peft.method, "$^"), p)]
    # Scanned layers share one module path, so a pattern selects a projection in every layer or in none.
    example = f"encoder/{'layers' if config.model.scan_layers else 'layer_0'}/self_attention/query"
    if config.peft.method in ("lora", "prompt") and not added:
        raise UserError(f"peft.method '{config.peft.method}' adds no parameter to this model: model.lora_targets "
                        f"'{config.model.lora_targets}' matches no layer path (e.g. '{example}'); fix "
                        f"--config.peft.lora_targets")
    if not any(rule(p) for p in paths):
        raise UserError(f"peft.method '{config.peft.method}' leaves no trainable parameter in this model; pick "
                        f"another method or set --config.peft.train_head=true")


def merge_lora(params: dict, alpha: float) -> dict:
    """Parameters with every adapter folded into its kernel (W + alpha/r A B) and the adapters removed."""
    from crosswrite_jax.models.layers import merged_kernel

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree and "lora_b" in tree:
            out = {k: v for k, v in tree.items() if k not in ("lora_a", "lora_b")}
            out["kernel"] = merged_kernel(tree["kernel"], tree["lora_a"], tree["lora_b"], alpha)
            return out
        return {k: walk(v) for k, v in tree.items()}

    return walk(params)


def merged_config(config: Config) -> Config:
    """The config of a model whose adapters were merged: the plain architecture, trained in full."""
    model = dataclasses.replace(config.model, lora_rank=0)
    return dataclasses.replace(config, model=model, peft=dataclasses.replace(config.peft, method="full"))


def split_trainable(params: dict, rule: Callable[[str], bool]) -> dict:
    """The sub-tree of parameters that trained."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if rule(k)}, sep="/")
