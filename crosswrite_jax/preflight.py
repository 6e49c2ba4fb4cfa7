"""Restore preflight: compare a checkpoint's parameter tree with the model's before reading any array."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from crosswrite_jax.errors import UserError
from crosswrite_jax.optim import path_str

log = logging.getLogger("crosswrite")


def saved_param_shapes(params_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of every array in a saved params item, from its metadata alone."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about a missing per-item metadata file it does not need
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(Path(params_dir).absolute())  # a relative path reads as empty
    finally:
        absl_logger.setLevel(level)
    tree = getattr(metadata, "item_metadata", metadata)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_str(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def compare(saved: dict[str, tuple[tuple[int, ...], str]], abstract_params: Any) -> list[tuple[str, str, str]]:
    """Rows (parameter, checkpoint, model) for every missing, unexpected or mismatched parameter."""
    expected = {path_str(p): (tuple(x.shape), str(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    rows = []
    for name in sorted(set(saved) | set(expected)):
        have, want = saved.get(name), expected.get(name)
        if have != want:
            rows.append((name, _describe(have), _describe(want)))
    return rows


def _describe(entry) -> str:
    return "missing" if entry is None else f"{entry[1]}{list(entry[0])}"


def check_params(step_dir: Path, abstract_params: Any) -> None:
    """Logs a table of mismatches and raises a one-line UserError when the checkpoint does not fit the model."""
    params_dir = Path(step_dir) / "params"
    if not params_dir.is_dir():
        return  # no such step: the restore names the steps there are
    try:
        saved = saved_param_shapes(params_dir)
    except Exception:  # unreadable metadata: the restore itself reports what is wrong
        return
    if not saved:
        return
    rows = compare(saved, abstract_params)
    if not rows:
        return
    width = max(len(r[0]) for r in rows)
    log.error("checkpoint %s does not fit the model:\n%s", step_dir, "\n".join(
        [f"  {'parameter':{width}s}  {'checkpoint':24s}  model"]
        + [f"  {name:{width}s}  {have:24s}  {want}" for name, have, want in rows]))
    name, have, want = rows[0]
    raise UserError(f"{step_dir}: {len(rows)} parameters do not fit the model (first: {name} is {have} in the "
                    f"checkpoint, {want} in the model); use the model config that trained it (drop model.* overrides)")
