"""`train.init_from`: parameters of another run's checkpoint or of a Hugging Face model directory, checked against
this model's layout and placed in its shards; what they lack (task heads, PEFT additions) starts fresh."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import jax
from flax import traverse_util

from crosswrite_jax import checkpoint, peft
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.config import SCANNED_LAYERS, Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.models import hf
from crosswrite_jax.models.transformer import param_shapes
from crosswrite_jax.preflight import check_params, saved_param_shapes
from crosswrite_jax.state import StateLayout

log = logging.getLogger("crosswrite")


def params_from(path: str, config: Config, layout: StateLayout, tokenizer) -> Any:
    """Parameters of another run's checkpoint, checked against this model and placed in its shards.

    Parameters matching a `train.init_exclude` pattern start from fresh initialisation, and so do those the
    checkpoint lacks that are task heads or PEFT additions (a classifier on a pretrained encoder, LoRA
    adapters, a soft prompt); both are logged, with the checkpoint entries left unused.
    """
    exclude = config.train.init_exclude
    abstract = layout.abstract_with_shardings().params
    fresh_if_missing = f"{peft.HEADS[config.model.family]}|{peft.ADDED}"
    if workdir_lib.is_hf_model_directory(path):
        return _params_from_hf(Path(path), config, layout, fresh_if_missing)
    _, checkpoint_dir, step = workdir_lib.locate_checkpoint(path)
    manager = checkpoint.open_manager(checkpoint_dir, read_only=True)
    try:
        newest = step if step is not None else manager.latest_step()
        if newest is None:
            raise UserError(f"train.init_from '{path}' holds no checkpoint; train it first")
        target, fresh_paths, unused = _partial_target(checkpoint_dir / str(newest), abstract, exclude,
                                                      fresh_if_missing)
        if not fresh_paths and not unused:
            check_params(checkpoint_dir / str(newest), layout.abstract.params)
            params, metadata, _ = checkpoint.restore_params(manager, abstract, step)
        else:
            loaded, metadata, _ = checkpoint.restore_params(manager, target, newest, strict=False)
            params = _merge_fresh(config, layout, loaded)
            if jax.process_index() == 0:
                log.info("init_from %s: %d parameter arrays loaded, %d freshly initialised (%s), %d checkpoint "
                         "arrays not used (%s)", path, len(jax.tree.leaves(loaded)), len(fresh_paths),
                         ", ".join(fresh_paths) or "none", len(unused), ", ".join(unused) or "none")
    finally:
        manager.close()
    workdir_lib.check_tokenizer(metadata, tokenizer, checkpoint_dir)
    return params


def _params_from_hf(directory: Path, config: Config, layout: StateLayout, fresh_if_missing: str) -> Any:
    """Parameters converted from a Hugging Face model directory, the rest (heads, adapters) freshly initialised."""
    exclude = config.train.init_exclude
    hf_config, tensors = hf.read_checkpoint(directory)
    kind, model_config = hf.config_from_hf(hf_config, tensors)
    model_config = dataclasses.replace(model_config, scan_layers=config.model.scan_layers)  # this run's layout
    loaded = traverse_util.flatten_dict(hf.params_from_hf(kind, model_config, tensors, param_shapes(model_config)),
                                        sep="/")
    abstract = traverse_util.flatten_dict(layout.abstract_with_shardings().params, sep="/")
    fresh = traverse_util.flatten_dict(layout.create_state(config.train.seed).params, sep="/")
    params, fresh_paths = {}, []
    for name, target in abstract.items():
        if any(re.fullmatch(p, name) for p in exclude) or (name not in loaded and re.fullmatch(fresh_if_missing, name)):
            params[name] = fresh[name]
            fresh_paths.append(name)
        elif name not in loaded:
            raise UserError(f"train.init_from '{directory}': parameter {name} is not in this {kind} checkpoint; add a "
                            f"pattern for it to train.init_exclude to initialise it fresh")
        elif tuple(loaded[name].shape) != tuple(target.shape):
            raise UserError(f"train.init_from '{directory}': {name} is {list(loaded[name].shape)} there but "
                            f"{list(target.shape)} in this model; make the model config match the checkpoint's "
                            f"config.json")
        else:
            params[name] = jax.device_put(loaded[name].astype(target.dtype), target.sharding)
    unused = sorted(set(loaded) - set(params))
    if jax.process_index() == 0:
        log.info("init_from %s (%s): %d parameter arrays loaded, %d freshly initialised (%s), %d not used (%s)",
                 directory, kind, len(params) - len(fresh_paths), len(fresh_paths), ", ".join(fresh_paths) or "none",
                 len(unused), ", ".join(unused) or "none")
    return traverse_util.unflatten_dict(params, sep="/")


def _partial_target(step_dir: Path, abstract: Any, exclude: tuple[str, ...],
                    fresh_if_missing: str = "$^") -> tuple[Any, list[str], list[str]]:
    """(restore target without the fresh parameters, fresh parameter paths, unused checkpoint paths)."""
    try:
        patterns = [re.compile(p) for p in exclude]
    except re.error as error:
        raise UserError(f"config key 'train.init_exclude': {error}; write Python regular expressions") from None
    saved = saved_param_shapes(step_dir / "params")
    flat = traverse_util.flatten_dict(abstract, sep="/")
    excluded = {name for name in flat if any(p.fullmatch(name) for p in patterns)}
    excluded |= {name for name in flat if name not in saved and re.fullmatch(fresh_if_missing, name)}
    for pattern in patterns:
        if not any(pattern.fullmatch(name) for name in flat):
            raise UserError(f"config key 'train.init_exclude': pattern '{pattern.pattern}' matches no parameter of "
                            f"the model (e.g. {next(iter(flat))}); fix or drop it")
    missing = sorted(n for n in flat if n not in saved and n not in excluded)
    if missing:
        raise UserError(f"{step_dir}: {len(missing)} model parameters are not in the checkpoint (first: "
                        f"{missing[0]}); {_layout_fix(saved, missing)}")
    for name in sorted(set(flat) - excluded):
        have, want = saved[name][0], tuple(flat[name].shape)
        if have != want:
            raise UserError(f"{step_dir}: parameter {name} is {list(have)} in the checkpoint but {list(want)} in "
                            f"the model; add it to train.init_exclude or use the model config that trained it")
    keep = {tuple(k.split("/")): v for k, v in flat.items() if k not in excluded}
    unused = sorted(n for n in saved if n not in flat or n in excluded)
    return traverse_util.unflatten_dict(keep), sorted(excluded), unused


def _layout_fix(saved: dict, missing: list[str]) -> str:
    """How to take the missing parameters: match the checkpoint's layer layout (model.scan_layers), or init fresh."""
    def layouts(names) -> set[bool]:  # True: scanned layers, False: unrolled ones
        return {f"/{SCANNED_LAYERS}/" in n for n in names if f"/{SCANNED_LAYERS}/" in n or re.search(r"/layer_\d+/", n)}

    theirs, ours = layouts(saved), layouts(missing)
    if len(theirs) == 1 and ours and theirs.isdisjoint(ours):
        scanned = theirs.pop()
        return (f"its layers are {'scanned' if scanned else 'unrolled'}: set "
                f"--config.model.scan_layers={str(scanned).lower()} to match")
    return "add patterns for them to train.init_exclude to initialise them fresh"


def _merge_fresh(config: Config, layout: StateLayout, loaded: Any) -> Any:
    """The loaded parameters with the fresh paths taken from this run's own initialisation."""
    merged = traverse_util.flatten_dict(layout.create_state(config.train.seed).params)
    merged.update(traverse_util.flatten_dict(loaded))
    return traverse_util.unflatten_dict(merged)
