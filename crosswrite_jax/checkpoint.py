"""Orbax checkpoints: async saves, resume, params-only restore onto any mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from crosswrite_jax.errors import UserError
from crosswrite_jax.state import StateLayout, TrainState

PARAMS, OPT_STATE, METADATA = "params", "opt_state", "metadata"


def open_manager(directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` holding params, optimizer state and metadata apart.

    `read_only` managers (for evaluation) neither create the directory nor delete old steps.
    """
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, enable_async_checkpointing=async_save,
        create=not read_only)
    return ocp.CheckpointManager(directory, options=options, item_names=(PARAMS, OPT_STATE, METADATA))


def save(manager: ocp.CheckpointManager, state: TrainState, metadata: dict[str, Any], *, force: bool = False) -> bool:
    """Starts an (async) save of the state at its step; returns whether one was started."""
    step = int(jax.device_get(state.step))
    return manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(state.params),
        OPT_STATE: ocp.args.StandardSave(state.opt_state),
        METADATA: ocp.args.JsonSave(dict(metadata, step=step)),
    }), force=force)


def restore_state(manager: ocp.CheckpointManager, layout: StateLayout, step: int | None = None
                  ) -> tuple[TrainState, dict[str, Any]]:
    """The full training state at `step` (newest if None), laid out as `layout` says."""
    step = _pick_step(manager, step)
    target = layout.abstract_with_shardings()
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(target.params),
        OPT_STATE: ocp.args.StandardRestore(target.opt_state),
        METADATA: ocp.args.JsonRestore(),
    }))
    step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), layout.shardings.step)
    return TrainState(step=step_array, params=restored[PARAMS], opt_state=restored[OPT_STATE]), restored[METADATA]


def restore_params(manager: ocp.CheckpointManager, abstract_params: Any, step: int | None = None
                   ) -> tuple[Any, dict[str, Any], int]:
    """Parameters alone (no optimizer state is read), placed by the shardings in `abstract_params`."""
    step = _pick_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_params),
        METADATA: ocp.args.JsonRestore(),
    }))
    return restored[PARAMS], restored[METADATA], step


def read_metadata(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata saved with a step."""
    step = _pick_step(manager, step)
    return manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]


def _pick_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"no checkpoint in '{manager.directory}'; train first or pass the right --workdir")
    if step is None:
        return max(steps)
    if step not in steps:
        raise UserError(f"no checkpoint at step {step} in '{manager.directory}'; saved steps: {sorted(steps)}")
    return step
