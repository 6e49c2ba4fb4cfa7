"""Parameter-efficient fine-tuning: which parameters train, LoRA merging, and adapter-only checkpoints.

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
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError

# Task heads: new on a pretrained encoder, so they train under every method (with peft.train_head). The output
# projection of generating models is pretrained like the rest and follows the method (LoRA leaves it frozen).
HEADS = {"encoder": r"(classifier|pooler|mlm_transform|mlm_norm)/.*|mlm_bias",
         "encoder_decoder": r"(?!)", "decoder": r"(?!)"}
METHOD_PARAMS = {"lora": r"(.*/)?lora_[ab]", "bitfit": r".*/bias|(.*/)?[^/]*norm[^/]*/scale",
                 "prompt": r"prompt/.*"}
FROZEN_PRESETS = {"embeddings": r"embed/.*", "encoder": r"(embed|encoder|prompt)/.*"}
ADDED = r"(.*/)?lora_[ab]|prompt/.*"  # parameters PEFT adds: absent from a base checkpoint, freshly initialised
ADAPTER_CONFIG = "adapter.json"


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
    if config.peft.method in ("lora", "prompt") and not added:
        raise UserError(f"peft.method '{config.peft.method}' adds no parameter to this model: model.lora_targets "
                        f"'{config.model.lora_targets}' matches no layer path (e.g. 'encoder/layer_0/self_attention/"
                        f"query'); fix --config.peft.lora_targets")
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


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_adapters(workdir: str | Path, out: str | Path, step: int | None = None) -> dict[str, Any]:
    """Writes the trained parameters of a PEFT run alone (adapters, prompt, biases, heads) with what rebuilds it.

    The base parameters are not copied: `load_adapters` takes them from the run's train.init_from.
    """
    from crosswrite_jax.evaluate import restore

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' is not empty; adapters go into a new directory")
    restored = restore(workdir, step)
    config = restored.run.config
    if config.peft.method == "full":
        raise UserError(f"'{workdir}' trained every parameter (peft.method full): there is no adapter to export; "
                        f"copy the run directory instead")
    if not config.train.init_from:
        raise UserError(f"'{workdir}' has no train.init_from: its frozen parameters are random, so an adapter "
                        f"alone cannot rebuild it; keep the full checkpoint")
    params = jax.device_get(split_trainable(restored.params, trainable_rule(config)))
    out.mkdir(parents=True, exist_ok=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save((out / "params").absolute(), params)
    shutil.copytree(restored.run.workdir / "tokenizer", out / "tokenizer")
    info = {"base": str(Path(config.train.init_from).absolute()), "step": restored.step,
            "config": json.loads(json.dumps(dataclasses.asdict(config)))}
    (out / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    full_bytes = _tree_bytes(jax.device_get(restored.params))
    adapter_bytes = _tree_bytes(params)
    return {"command": "peft export", "out": str(out), "step": restored.step, "method": config.peft.method,
            "adapter_parameters": sum(int(np.size(x)) for x in jax.tree.leaves(params)),
            "adapter_bytes": adapter_bytes, "full_bytes": full_bytes,
            "fraction": round(adapter_bytes / full_bytes, 5), "files_bytes": _directory_bytes(out)}


def load_adapters(adapter_dir: str | Path, mesh=None) -> tuple[Config, Any]:
    """(config, full parameters) rebuilt from an adapter directory and the base checkpoint it names."""
    from crosswrite_jax import config as config_lib, sharding
    from crosswrite_jax.data.tokenizer import Tokenizer
    from crosswrite_jax.train import Trainer, params_from

    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"'{adapter_dir}' holds no {ADAPTER_CONFIG}; pass a directory written by `crosswrite peft "
                        f"export`")
    info = json.loads(path.read_text())
    config = config_lib.from_dict(info["config"], str(path))
    config = config_lib.override(config, {"mesh.shape": (-1, 1, 1)})
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.shape)
    trainer = Trainer.build(config, mesh)
    base = params_from(info["base"], trainer, Tokenizer.load(adapter_dir / "tokenizer"))
    abstract = split_trainable(trainer.layout.abstract_with_shardings().params, trainable_rule(config))
    with ocp.PyTreeCheckpointer() as checkpointer:
        adapters = checkpointer.restore((adapter_dir / "params").absolute(), args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(adapters))
    return config, traverse_util.unflatten_dict(flat)


def merge(out: str | Path, workdir: str | Path | None = None, adapters: str | Path | None = None,
          step: int | None = None) -> dict[str, Any]:
    """Writes a plain run directory (adapters folded in, one checkpoint) from a LoRA run or an adapter directory."""
    from crosswrite_jax import checkpoint, config as config_lib
    from crosswrite_jax.evaluate import restore
    from crosswrite_jax.workdir import CHECKPOINTS, CONFIG_FILE, TOKENIZER

    out = Path(out)
    if (workdir is None) == (adapters is None):
        raise UserError("pass exactly one of --workdir RUN and --adapters DIR")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' is not empty; the merged run goes into a new directory")
    if workdir is not None:
        restored = restore(workdir, step)
        config, params, tokenizer_dir = restored.run.config, restored.params, Path(workdir) / TOKENIZER
        step = restored.step
    else:
        config, params = load_adapters(adapters)
        tokenizer_dir, step = Path(adapters) / TOKENIZER, 0
    if config.model.lora_rank:
        params = merge_lora(params, config.model.lora_alpha)
    params = jax.device_get(params)
    merged = merged_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save_json(merged, out / CONFIG_FILE)
    shutil.copytree(tokenizer_dir, out / TOKENIZER)
    from crosswrite_jax.data.tokenizer import Tokenizer

    manager = checkpoint.open_manager(out / CHECKPOINTS, async_save=False)
    metadata = {"step": 0, "source": str(workdir or adapters), "merged_from_step": step,
                "tokenizer_fingerprint": Tokenizer.load(tokenizer_dir).fingerprint}
    manager.save(0, args=ocp.args.Composite(**{checkpoint.PARAMS: ocp.args.StandardSave(params),
                                               checkpoint.METADATA: ocp.args.JsonSave(metadata)}))
    manager.wait_until_finished()
    manager.close()
    return {"command": "peft merge", "out": str(out), "from_step": step,
            "lora_merged": bool(config.model.lora_rank), "parameters": sum(int(np.size(x)) for x in
                                                                          jax.tree.leaves(params))}
