"""`import-hf` and `export-hf`: Hugging Face model directories to run directories and back."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax import config as config_lib
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.models import hf
from crosswrite_jax.models.transformer import param_shapes
from crosswrite_jax.state import build_layout
from crosswrite_jax.tasks import pretraining_task
from crosswrite_jax.workdir import CHECKPOINTS, CONFIG_FILE, TOKENIZER, locate_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "spiece.model", "tokenizer.model", "merges.txt", "vocab.json", "added_tokens.json")


def _copy_tokenizer(source: Path, target: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def import_hf(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Writes a run directory (config.json, tokenizer/, checkpoints/0 with params) from a HF model directory."""
    source, out = Path(source), Path(out)
    if (out / CHECKPOINTS).exists():
        raise UserError(f"'{out}' already holds checkpoints; import into a new directory")
    hf_config, tensors = hf.read_checkpoint(source)
    kind, model_config = hf.config_from_hf(hf_config, tensors)
    params = hf.params_from_hf(kind, model_config, tensors, param_shapes(model_config))
    task = pretraining_task(model_config.family).name
    config = Config(name=f"imported-{kind}", task=task, model=model_config)
    metadata = {"step": 0, "source": str(source), "architecture": kind, "tokenizer_fingerprint": None}
    checkpoint.write_run(out, config, params, metadata)
    copied = _copy_tokenizer(source, out / TOKENIZER)
    count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return {"command": "import-hf", "architecture": kind, "parameters": count, "tokenizer_files": copied,
            "workdir": str(out)}


def export_hf(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Writes config.json, model.safetensors and the tokenizer of a run's checkpoint for transformers."""
    run_dir, checkpoint_dir, step = locate_checkpoint(source)
    config = config_lib.load_json(run_dir / CONFIG_FILE)
    kind = hf.kind_of(config.model)
    config = dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, shape=(1, 1, 1)))
    layout = build_layout(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))  # this model on one device
    manager = checkpoint.open_manager(checkpoint_dir, read_only=True)
    try:
        params, _, step = checkpoint.restore_params(manager, layout.abstract_with_shardings().params, step)
    finally:
        manager.close()
    params = jax.tree.map(np.asarray, jax.device_get(params))
    hf.write_checkpoint(out, hf.config_to_hf(kind, config.model), hf.params_to_hf(kind, config.model, params))
    copied = _copy_tokenizer(run_dir / TOKENIZER, Path(out))
    return {"command": "export-hf", "architecture": kind, "step": step, "tokenizer_files": copied, "out": str(out)}
