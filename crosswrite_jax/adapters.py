"""`crosswrite peft export` and `crosswrite peft merge`: adapter-only checkpoints of PEFT runs, their rebuilding
on a base checkpoint, and LoRA runs folded into plain run directories. Which parameters train: `peft`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax import config as config_lib
from crosswrite_jax.config import Config
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import restore
from crosswrite_jax.initialize import params_from
from crosswrite_jax.peft import merge_lora, merged_config, split_trainable, trainable_rule
from crosswrite_jax.state import build_layout
from crosswrite_jax.workdir import TOKENIZER

ADAPTER_CONFIG = "adapter.json"


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_adapters(workdir: str | Path, out: str | Path, step: int | None = None) -> dict[str, Any]:
    """Writes the trained parameters of a PEFT run alone (adapters, prompt, biases, heads) with what rebuilds it.

    The base parameters are not copied: `load_adapters` takes them from the run's train.init_from.
    """
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
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"'{adapter_dir}' holds no {ADAPTER_CONFIG}; pass a directory written by `crosswrite peft "
                        f"export`")
    info = json.loads(path.read_text())
    config = config_lib.from_dict(info["config"], str(path))
    config = config_lib.override(config, {"mesh.shape": (-1, 1, 1)})
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.shape)
    layout = build_layout(config, mesh)
    base = params_from(info["base"], config, layout, Tokenizer.load(adapter_dir / "tokenizer"))
    abstract = split_trainable(layout.abstract_with_shardings().params, trainable_rule(config))
    with ocp.PyTreeCheckpointer() as checkpointer:
        adapters = checkpointer.restore((adapter_dir / "params").absolute(), args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(adapters))
    return config, traverse_util.unflatten_dict(flat)


def merge(out: str | Path, workdir: str | Path | None = None, adapters: str | Path | None = None,
          step: int | None = None) -> dict[str, Any]:
    """Writes a plain run directory (adapters folded in, one checkpoint) from a LoRA run or an adapter directory."""
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
    metadata = {"step": 0, "source": str(workdir or adapters), "merged_from_step": step,
                "tokenizer_fingerprint": Tokenizer.load(tokenizer_dir).fingerprint}
    checkpoint.write_run(out, merged, params, metadata)
    shutil.copytree(tokenizer_dir, out / TOKENIZER)
    return {"command": "peft merge", "out": str(out), "from_step": step,
            "lora_merged": bool(config.model.lora_rank), "parameters": sum(int(np.size(x)) for x in
                                                                          jax.tree.leaves(params))}
