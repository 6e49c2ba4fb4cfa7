"""A jax.profiler trace of a few steady-state training steps, for TensorBoard's profile tab."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("crosswrite")


class StepProfiler:
    """Traces steps [first, first + count) into `directory` (compilation is done by then: first is the run's
    second step). View with `tensorboard --logdir DIRECTORY`."""

    def __init__(self, directory: str | Path, first: int, count: int, enabled: bool = True):
        self.directory, self.first, self.last = Path(directory), first, first + count - 1
        self.enabled, self.active = enabled and count > 0, False

    def before(self, step: int) -> None:
        """Call before dispatching `step`."""
        if self.enabled and step == self.first and not self.active:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        """Call after dispatching `step`; ends the trace (waiting for its outputs) after the last one."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s (tensorboard --logdir %s)", self.first + 1,
                     self.last + 1, self.directory, self.directory)
