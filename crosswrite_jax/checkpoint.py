"""Orbax checkpoints: async saves, resume, params-only restore onto any mesh, checksummed steps.

Every committed step gets a checksum manifest (see `integrity`), written once its async save has finished:
by the next `save`, and by `finalize` after the last one. Restores without an explicit step take the newest
step that verifies and restores, falling back to older ones; on resume, newer corrupt steps are moved aside
to `<step>.corrupt-<unix time>` so that training can save those steps again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from crosswrite_jax import config as config_lib
from crosswrite_jax import integrity
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.state import StateLayout, TrainState
from crosswrite_jax.workdir import CHECKPOINTS, CONFIG_FILE

PARAMS, OPT_STATE, METADATA, DATA = "params", "opt_state", "metadata", "data"

log = logging.getLogger("crosswrite")
_writable: weakref.WeakSet = weakref.WeakSet()  # managers opened for training (may move corrupt steps aside)


def open_manager(directory: str | Path, *, max_to_keep: int = 2, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` holding params, optimizer state and metadata apart.

    `read_only` managers (for evaluation) neither create the directory nor delete old steps. Others first
    remove the temporary directories of saves that never committed (Orbax leaves them by default).
    """
    directory = Path(directory).absolute()
    if not read_only:
        remove_unfinished_saves(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, enable_async_checkpointing=async_save,
        create=not read_only)
    handlers = {PARAMS: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
                METADATA: ocp.JsonCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()}
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    if not read_only:
        _writable.add(manager)
    return manager


def remove_unfinished_saves(directory: str | Path) -> list[str]:
    """Deletes `<step>.orbax-checkpoint-tmp*` directories (saves interrupted before their commit) on process 0.

    Only names matching that pattern are touched, never a committed step. Returns the names removed.
    Not Orbax's CheckpointManagerOptions(cleanup_tmp_directories=True): in orbax-checkpoint 0.12.8 that runs in a
    background thread awaited only by the next save (not by close), and removes every directory whose name merely
    contains '.orbax-checkpoint-tmp' (e.g. a user's 'notes.orbax-checkpoint-tmp').
    """
    if jax.process_index() != 0:
        return []
    removed = []
    for path in integrity.leftover_tmp_dirs(directory):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.info("removed unfinished checkpoint save(s) in %s: %s", directory, ", ".join(removed))
    return removed


def step_dir(manager: ocp.CheckpointManager, step: int) -> Path:
    """The directory of a step."""
    return Path(str(manager.directory)) / str(step)


def finalize(manager: ocp.CheckpointManager) -> list[int]:
    """Waits for the save in flight, then writes the manifest of every committed step lacking one.

    Called by `save` before it starts the next save, and to be called once more after training's last
    save (before `manager.close()`). Only process 0 writes, and only for managers opened for training
    (`open_manager(..., read_only=False)`). Returns the steps given a manifest.
    """
    manager.wait_until_finished()
    if jax.process_index() != 0 or manager not in _writable:
        return []
    written = []
    for step in sorted(manager.all_steps()):
        path = step_dir(manager, step)
        if not path.is_dir() or integrity.has_manifest(path):
            continue
        try:
            integrity.write_manifest(path)
        except FileNotFoundError:  # the step went away meanwhile
            continue
        written.append(step)
    return written


def save(manager: ocp.CheckpointManager, state: TrainState, metadata: dict[str, Any], *, force: bool = False,
         data_iterator: grain.DatasetIterator | None = None) -> bool:
    """Starts an (async) save of the state at its step; returns whether one was started.

    The previous save is finished first and its step gets its manifest (Orbax would wait for it anyway:
    one async save runs at a time). A data iterator's position is saved too (each process its own).
    """
    step = int(jax.device_get(state.step))
    if force or manager.should_save(step):
        finalize(manager)
    items = {
        PARAMS: ocp.args.StandardSave(state.params),
        OPT_STATE: ocp.args.StandardSave(state.opt_state),
        METADATA: ocp.args.JsonSave(dict(metadata, step=step)),
    }
    if data_iterator is not None:  # its position now, not when the async write gets to it
        items[DATA] = grain.checkpoint.CheckpointSave(_IteratorPosition(data_iterator.get_state()))
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def write_run(out: str | Path, config: Config, params: Any, metadata: dict[str, Any]) -> None:
    """Writes a run directory that starts from `params`: config.json and checkpoints/0 (params and metadata).

    The tokenizer is the caller's to add (tokenizer/). Training or evaluation can then use the directory as is.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save_json(config, out / CONFIG_FILE)
    manager = open_manager(out / CHECKPOINTS, async_save=False)
    try:
        manager.save(0, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params),
                                                   METADATA: ocp.args.JsonSave(dict(metadata, step=0))}))
        manager.wait_until_finished()
    finally:
        manager.close()


class _IteratorPosition:
    """A data iterator's state, frozen at save time, in the form grain's checkpoint handler writes."""

    def __init__(self, state: dict[str, Any]):
        self._json = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._json


def restore_state(manager: ocp.CheckpointManager, layout: StateLayout, step: int | None = None,
                  data_iterator: grain.DatasetIterator | None = None,
                  preflight: Callable[[Path], None] | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The full training state at `step` (newest intact one if None), laid out as `layout` says.

    Given a data iterator, its saved position is restored into it (metadata['data_restored'] tells whether
    the step had one). `preflight(step_dir)` runs on the step about to be read; its UserError stops the restore.

    With step=None, a step that fails its checksums or its restore is skipped with a warning for the one
    before; on a manager opened for training, skipped steps newer than the one restored are then moved aside
    (`<step>.corrupt-<time>`), so the run can save them again. A corrupt explicit `step` is a UserError.
    """
    target = layout.abstract_with_shardings()

    def read(s: int):
        if preflight is not None:
            preflight(step_dir(manager, s))
        items = {PARAMS: ocp.args.StandardRestore(target.params),
                 OPT_STATE: ocp.args.StandardRestore(target.opt_state), METADATA: ocp.args.JsonRestore()}
        if data_iterator is not None and (step_dir(manager, s) / DATA).is_dir():
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = manager.restore(s, args=ocp.args.Composite(**items))
        restored[METADATA]["data_restored"] = DATA in items
        return restored

    step, restored = _restore_intact(manager, step, read)
    step_array = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), layout.shardings.step)
    return TrainState(step=step_array, params=restored[PARAMS], opt_state=restored[OPT_STATE]), restored[METADATA]


def restore_params(manager: ocp.CheckpointManager, abstract_params: Any, step: int | None = None, *,
                   strict: bool = True) -> tuple[Any, dict[str, Any], int]:
    """Parameters alone (no optimizer state is read), placed by the shardings in `abstract_params`.

    Returns (params, metadata, step). With step=None, the newest step that verifies and restores, as in
    `restore_state`. `strict=False` reads a subset: the arrays named in `abstract_params`.
    """
    def read(s: int) -> dict[str, Any]:
        if strict:
            return manager.restore(s, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(abstract_params), METADATA: ocp.args.JsonRestore()}))
        restored = manager.restore(s, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
        with ocp.PyTreeCheckpointer() as checkpointer:
            params = checkpointer.restore(step_dir(manager, s) / PARAMS, args=ocp.args.PyTreeRestore(
                item=abstract_params, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params),
                partial_restore=True))
        return {PARAMS: params, METADATA: restored[METADATA]}

    step, restored = _restore_intact(manager, step, read)
    return restored[PARAMS], restored[METADATA], step


def _pick_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"no checkpoint in '{manager.directory}'; train first or pass the right --workdir")
    if step is None:
        return max(steps)
    if step not in steps:
        raise UserError(f"no checkpoint at step {step} in '{manager.directory}'; saved steps: {sorted(steps)}")
    return step


def _restore_intact(manager: ocp.CheckpointManager, step: int | None, read: Callable[[int], Any]) -> tuple[int, Any]:
    """(step, read(step)) for the requested step, or for the newest step that verifies and reads."""
    _pick_step(manager, step)  # a UserError when there is no such step
    directory = Path(str(manager.directory))
    if step is not None:
        problems = _verify(step_dir(manager, step))
        if problems:
            raise UserError(f"checkpoint step {step} in '{directory}' is corrupt: {'; '.join(problems)}; "
                            f"restore another step (saved: {sorted(manager.all_steps())})")
        return step, read(step)
    rejected: list[tuple[int, str]] = []
    last_error: Exception | None = None
    candidates = sorted(manager.all_steps(), reverse=True)
    for i, candidate in enumerate(candidates):
        problems = _verify(step_dir(manager, candidate))
        if problems:
            reason = f"is corrupt: {'; '.join(problems)}"
        else:
            try:
                restored = read(candidate)
            except UserError:  # the step is fine but does not fit (preflight): falling back would hide that
                raise
            except Exception as error:  # Orbax/TensorStore errors on damaged files have no common type
                last_error = error
                reason = f"could not be restored: {_one_line(error)}"
            else:
                if rejected:
                    log.warning("using checkpoint step %d; newer step(s) %s skipped", candidate,
                                ", ".join(str(s) for s, _ in rejected))
                    _set_aside(manager, [s for s, _ in rejected])
                return candidate, restored
        log.warning("checkpoint step %d in %s %s; %s", candidate, directory, reason,
                    "falling back to the step before" if i + 1 < len(candidates) else "no older step left")
        rejected.append((candidate, reason))
    raise UserError(f"no intact checkpoint in '{directory}': "
                    + "; ".join(f"step {s} {reason}" for s, reason in rejected)
                    + "; restore the damaged files from a copy, or start over in a new --workdir") from last_error


def _verify(path: Path) -> list[str]:
    """integrity.verify_step, read once: on several processes, process 0 checks and all agree."""
    if jax.process_count() == 1:
        return integrity.verify_step(path)
    from jax.experimental import multihost_utils

    problems = integrity.verify_step(path) if jax.process_index() == 0 else []
    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(problems)))) and not problems:
        problems = ["failed verification on process 0 (see its log)"]
    return problems


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """On a training manager, renames skipped steps to `<step>.corrupt-<time>` (kept for inspection)."""
    directory = Path(str(manager.directory))
    if manager not in _writable:
        log.warning("kept corrupt step(s) %s in %s (read-only)", sorted(steps), directory)
        return
    if jax.process_index() == 0:
        stamp = int(time.time())
        for step in steps:
            source = step_dir(manager, step)
            target = directory / integrity.set_aside_name(step, stamp)
            source.rename(target)
            log.warning("moved corrupt checkpoint step %d aside to %s", step, target)
    ocp.multihost.sync_global_processes("crosswrite:checkpoint:set_aside")
    manager.reload()


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
