"""Joins this process to JAX's multi-controller runtime (one process per host) before any backend starts.

Three ways a run gets its processes:
- explicit: `distributed.coordinator_address`, `num_processes` and `process_id` (GPU clusters, a CPU rehearsal
  with launch/local_multihost.sh); each may come from $CROSSWRITE_COORDINATOR, $CROSSWRITE_NUM_PROCESSES and
  $CROSSWRITE_PROCESS_ID instead, which fill the keys left at their defaults;
- detected: on a Cloud TPU VM, under SLURM with several tasks or under Open MPI, jax.distributed finds the
  coordinator and the process ids itself;
- neither: one process, and nothing is initialized.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax

from crosswrite_jax.config import DistributedConfig
from crosswrite_jax.errors import UserError

ENV_COORDINATOR = "CROSSWRITE_COORDINATOR"
ENV_NUM_PROCESSES = "CROSSWRITE_NUM_PROCESSES"
ENV_PROCESS_ID = "CROSSWRITE_PROCESS_ID"
# CLOUD_TPU_TASK_ID is not among them: libtpu sets it on any machine where it compiles (compile-check).
TPU_ENV = ("TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")

log = logging.getLogger("crosswrite")


def with_environment(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """The config with $CROSSWRITE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID filling keys left at default."""
    environ = os.environ if environ is None else environ
    updates: dict[str, Any] = {}
    if not config.coordinator_address and environ.get(ENV_COORDINATOR):
        updates["coordinator_address"] = environ[ENV_COORDINATOR]
    for key, name in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        if getattr(config, key) == getattr(DistributedConfig(), key) and environ.get(name, "").strip():
            try:
                updates[key] = int(environ[name])
            except ValueError:
                raise UserError(f"${name} is {environ[name]!r}; it must be a whole number") from None
    return dataclasses.replace(config, **updates)


def _tpu_value(value: str) -> bool:
    """A real TPU_* setting: libtpu, loaded where there is no TPU, stores 'WARNING: could not determine ...' in them,
    which processes started from that one inherit."""
    return bool(value.strip()) and not value.startswith("WARNING")


def detect_cluster(environ: Mapping[str, str] | None = None) -> str:
    """'cloud_tpu', 'slurm', 'openmpi' when such a multi-process environment is present; else ''."""
    environ = os.environ if environ is None else environ
    if any(_tpu_value(environ.get(name, "")) for name in TPU_ENV) or _on_cloud_tpu_vm():
        return "cloud_tpu"
    if environ.get("SLURM_JOB_ID") and _int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")) > 1:
        return "slurm"
    if environ.get("OMPI_MCA_orte_hnp_uri") and _int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "openmpi"
    return ""


def initialize_arguments(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for jax.distributed.initialize, or None for a single process."""
    config = with_environment(config, environ)
    _check(config)
    timeouts = {"initialization_timeout": config.initialization_timeout,
                "heartbeat_timeout_seconds": config.heartbeat_timeout}
    if config.coordinator_address or config.num_processes > 1:
        if not config.coordinator_address or config.num_processes < 1 or config.process_id < 0:
            raise UserError(
                "several processes need all of distributed.coordinator_address (host:port of process 0), "
                "distributed.num_processes and distributed.process_id; got "
                f"{config.coordinator_address!r}, {config.num_processes}, {config.process_id} (or set "
                f"${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})")
        if config.num_processes == 1:
            return None
        return dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                    process_id=config.process_id, **timeouts)
    if config.num_processes == 1:
        return None
    cluster = detect_cluster(environ)
    if not cluster:
        if config.process_id >= 0:
            raise UserError(f"distributed.process_id is {config.process_id} but no cluster was detected; set "
                            f"distributed.coordinator_address and distributed.num_processes too")
        return None
    detected = {"num_processes": config.num_processes or None,
                "process_id": config.process_id if config.process_id >= 0 else None}
    return dict({k: v for k, v in detected.items() if v is not None}, **timeouts)


def initialize(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Starts jax.distributed when the run has several processes; returns whether it did.

    Must run before anything touches a JAX backend. Processes other than 0 then log warnings only.
    """
    if jax.distributed.is_initialized():
        return True
    arguments = initialize_arguments(config, environ)
    if arguments is None:
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise UserError("jax.distributed must start before any JAX computation; initialize() came too late")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo (TCP)
    log.info("joining the other processes: %s (up to %d s; if one dies, the rest stop within %d s)",
             _describe(arguments), arguments["initialization_timeout"], arguments["heartbeat_timeout_seconds"])
    try:
        jax.distributed.initialize(**arguments)
    except (RuntimeError, ValueError) as error:  # a coordinator that never answers, a bad address
        raise UserError(f"could not join the other processes ({_first_line(error)}); check "
                        f"distributed.coordinator_address and that every process runs the same command") from None
    quiet_other_processes()
    if is_main_process():
        log.info("process 0 of %d; %d devices in all, %d here", jax.process_count(), jax.device_count(),
                 jax.local_device_count())
    return True


def _describe(arguments: dict[str, Any]) -> str:
    if "coordinator_address" not in arguments:
        return f"{detect_cluster() or 'cluster'} detected"
    return (f"process {arguments['process_id']} of {arguments['num_processes']}, coordinator "
            f"{arguments['coordinator_address']}")


def quiet_other_processes() -> None:
    """Processes other than 0 log warnings and errors only, so one log tells the story."""
    if jax.process_index() != 0:
        logging.getLogger("crosswrite").setLevel(logging.WARNING)


def is_main_process() -> bool:
    """True on process 0 (and when there is only one); reports and summaries are printed there."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def _check(config: DistributedConfig) -> None:
    if config.num_processes < 0 or config.process_id < -1:
        raise UserError(f"distributed.num_processes must be >= 0 and distributed.process_id >= -1, got "
                        f"{config.num_processes} and {config.process_id}")
    if config.num_processes and config.process_id >= config.num_processes:
        raise UserError(f"distributed.process_id {config.process_id} is outside [0, {config.num_processes}) "
                        f"(distributed.num_processes)")
    if config.coordinator_address and not _looks_like_host_port(config.coordinator_address):
        raise UserError(f"distributed.coordinator_address {config.coordinator_address!r} must be HOST:PORT, "
                        f"e.g. 10.0.0.2:1234")
    for key in ("initialization_timeout", "heartbeat_timeout"):
        if getattr(config, key) <= 0:
            raise UserError(f"distributed.{key} must be a positive number of seconds, got {getattr(config, key)}")


def _looks_like_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _on_cloud_tpu_vm() -> bool:
    """Whether jax found TPU chips and libtpu at import (a Cloud TPU VM); reads no metadata server."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
