"""A jax.profiler trace of a few steady-state training steps, for TensorBoard's profile tab; counts of the XLA
programs a run compiles."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import jax
from jax import monitoring

log = logging.getLogger("crosswrite")


def cost_analysis(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a lowered or compiled program as one dict (older jax: one per program; {} if none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def peak_host_bytes() -> int:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


# jax._src.dispatch.BACKEND_COMPILE_EVENT: one XLA compilation (or persistent-cache load) of one program
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_compiles = {"programs": 0, "seconds": 0.0, "cache_hits": 0}  # process-wide, since the listeners were registered
_lock = threading.Lock()
_listening = False


def _on_duration(event: str, duration: float, **_: Any) -> None:
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _compiles["programs"] += 1
            _compiles["seconds"] += duration


def _on_event(event: str, **_: Any) -> None:
    if event == CACHE_HIT_EVENT:
        with _lock:
            _compiles["cache_hits"] += 1


class CompileCounter:
    """The XLA programs this process compiled (or loaded from the persistent compilation cache) since the counter
    was made, and the seconds that took, from jax.monitoring's compilation events."""

    def __init__(self) -> None:
        global _listening
        with _lock:
            if not _listening:  # once per process: JAX keeps listeners for good
                monitoring.register_event_duration_secs_listener(_on_duration)
                monitoring.register_event_listener(_on_event)
                _listening = True
            self.start = dict(_compiles)

    def counts(self) -> dict[str, Any]:
        """compiled_programs, compile_seconds and compile_cache_hits since the counter was made."""
        with _lock:
            now = dict(_compiles)
        return {"compiled_programs": now["programs"] - self.start["programs"],
                "compile_seconds": round(now["seconds"] - self.start["seconds"], 2),
                "compile_cache_hits": now["cache_hits"] - self.start["cache_hits"]}


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms ticks), or None where /proc is absent."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK"), 0.0)  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


class PhaseClock:
    """Wall seconds of a run's consecutive phases, from the process's start: `mark(name)` ends the phase `name`.

    The first phase, `imports`, runs from the interpreter's start to the clock's creation (Python, the imports and
    the config); it is absent where the process's start time is unknown.
    """

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        age = process_age()
        if age is not None:
            self.phases["imports"] = round(age, 2)
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self._last, 2)
        self._last = now

    def describe(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.phases.items())
