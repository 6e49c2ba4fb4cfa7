"""Compiles a config's exact sharded train step for a Cloud TPU topology on this machine (no TPU needed).

libtpu (`pip install 'crosswrite-jax[tpu-compile]'`) describes the topology's chips to XLA as compile-only devices;
the mesh, shardings and train step are the ones `crosswrite train` builds, lowered on abstract state and on the
batch the task's pipeline makes (Task.batch_shapes: every task, its widest bucket when rows are not packed) and
compiled ahead of time. XLA's memory analysis then says what one chip holds (whether the run fits in HBM), and
its cost analysis of the step without loops (program_flops_per_step) how many FLOPs a step takes against the model's
(the step-time bound and MFU ceiling at the chip's peak).

Compiling takes host memory and time as the real compile would: with scanned layers the pod recipes compiled in 1 to
2 minutes with 2 to 5 GB on 2 shared CPU cores; unrolled, Llama 1B's 16 layers for 256 chips took 6 minutes and
T5-XL's 48 for 64 chips needed more than 22 GB (docs/PERFORMANCE.md). Only one libtpu normally loads per machine;
compile checks set ALLOW_MULTIPLE_LIBTPU_LOAD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import jax
import numpy as np

from crosswrite_jax import peft, sharding
from crosswrite_jax.chips import ALIASES, CHIPS, Chip, GiB
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError
from crosswrite_jax.flops import batch_lengths, step_flops
from crosswrite_jax.profiling import cost_analysis, peak_host_bytes
from crosswrite_jax.trainer import Trainer

EXAMPLES = "v5e-256, v5litepod-16, v4-128, v5p-256, v6e-64 or v5e:16x16, v4:4x4x8"


@dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip and the chip grid libtpu knows it by (e.g. 'v5e:16x16')."""

    chip: Chip
    grid: tuple[int, ...]
    name: str  # as the user wrote it

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.grid))}"


def parse_topology(name: str) -> Topology:
    """'v5e-256' (an accelerator type) or 'v5e:16x16' (a chip grid) -> Topology; UserError otherwise."""
    text = name.strip().lower()
    match = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", text)
    generation = ALIASES.get(match.group(1), match.group(1)) if match else ""
    if not match or generation not in CHIPS:
        raise UserError(f"--topology '{name}' is not a TPU slice this knows; write e.g. {EXAMPLES}")
    chip, size = CHIPS[generation], match.group(3)
    if match.group(2) == ":":
        grid = tuple(int(d) for d in size.split("x") if d)
        if len(grid) != chip.dims or min(grid) < 1:
            raise UserError(f"--topology '{name}': a {generation} grid has {chip.dims} sizes, e.g. "
                            f"{generation}:{'x'.join(['2'] * chip.dims)}")
        return Topology(chip, grid, name)
    if not size.isdigit() or int(size) % chip.cores_per_chip_in_name:
        raise UserError(f"--topology '{name}': the size after '-' is a whole number of "
                        f"{'TensorCores (2 per chip)' if chip.cores_per_chip_in_name == 2 else 'chips'}")
    return Topology(chip, _grid(int(size) // chip.cores_per_chip_in_name, chip.dims, name), name)


def _grid(chips: int, dims: int, name: str) -> tuple[int, ...]:
    """The chip grid of a slice of `chips` chips: 2x2 (x1) doubled along its shortest side, as Cloud TPU does."""
    if chips == 1 and dims == 2:
        return (1, 1)
    grid = [2, 2] + [1] * (dims - 2)
    while math.prod(grid) < chips:
        shortest = max(i for i, d in enumerate(grid) if d == min(grid))
        grid[shortest] *= 2
        grid.sort()
    if math.prod(grid) != chips:
        raise UserError(f"--topology '{name}': {chips} chips is not a slice size (1, 4, 8, 16, ... chips)")
    return tuple(grid)


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """The compile-only devices of `num_slices` such slices, described by libtpu."""
    _require_libtpu()
    from jax.experimental import topologies

    options: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    if topology.chip.generation == "v4":
        options["chip_config_name"] = "megacore"  # one JAX device per chip, as on a v4 TPU VM
    try:
        with _no_tpu_host(topology.chip):
            return list(topologies.get_topology_desc(topology.libtpu_name, "tpu", **options).devices)
    except Exception as error:  # libtpu raises XlaRuntimeError / RuntimeError with its own text
        raise UserError(f"libtpu could not describe topology {topology.libtpu_name} ({_first_line(error)})") from None


@contextlib.contextmanager
def _no_tpu_host(chip: Chip) -> Iterator[None]:
    """Tells libtpu, while it starts, that this machine is no TPU host (else it warns about each missing setting).

    The variables are removed again afterwards: TPU_* settings make `distributed` take the machine for a Cloud TPU.
    """
    settings = {"TPU_ACCELERATOR_TYPE": chip.accelerator_type, "TPU_WORKER_HOSTNAMES": "localhost",
                "TPU_WORKER_ID": "0", "TPU_SKIP_MDS_QUERY": "1",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # no chips to guard: compile checks may run side by side
    added = [] if _on_tpu_vm() else [k for k in settings if k not in os.environ]
    os.environ.update({k: settings[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _require_libtpu() -> None:
    from jax._src.cloud_tpu_init import get_tpu_library_path

    if get_tpu_library_path() is None:
        raise UserError("compile-check needs libtpu to compile for TPUs: pip install 'crosswrite-jax[tpu-compile]' "
                        "(libtpu 0.0.42.1 for jax 0.10.2)")


def _on_tpu_vm() -> bool:
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def abstract_batch(config: Config, mesh=None) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch as the task's pipeline makes it (its widest bucket when unpacked; Task.batch_shapes),
    sharded over the mesh's data-parallel axes when a mesh is given."""
    from crosswrite_jax.tasks import get_task

    spec = sharding.batch_sharding(mesh) if mesh is not None else None
    shapes = get_task(config.task).batch_shapes(config.data)
    return {k: jax.ShapeDtypeStruct((config.train.batch_size, *shape), np.int32, sharding=spec)
            for k, shape in shapes.items()}


def per_chip_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes of one device's shard of every array of a tree (the largest shard where shards differ)."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(spec.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def program_flops_per_step(config: Config) -> float:
    """XLA's count of every FLOP of a train step (all chips): its cost analysis of the step lowered on one CPU device
    with no loops (layers unrolled, one microbatch, logits unchunked: the same arithmetic), since a compiled
    program's cost analysis counts a loop's body once. 0 where XLA gives no count."""
    model = dataclasses.replace(config.model, scan_layers=False)
    train = dataclasses.replace(config.train, grad_accum_steps=1, logits_chunk_length=0)
    flat = dataclasses.replace(config, model=model, train=train)
    trainer = Trainer.build(flat, sharding.make_mesh((1, 1, 1), jax.devices("cpu")[:1]))
    with trainer.context():
        lowered = trainer.jit_train_step().lower(trainer.layout.abstract_with_shardings(),
                                                 abstract_batch(flat, trainer.mesh))
        cost = cost_analysis(lowered)
    return float(cost.get("flops", 0.0))


def model_flops_per_step(config: Config) -> float:
    """Matmul FLOPs of a training step (flops.step_flops: forward and backward) at the shapes of abstract_batch."""
    rows, source, target = batch_lengths(config.model.family, abstract_batch(config))
    return step_flops(config.model, rows, source, target).training


@dataclass
class Report:
    """What one chip holds and computes in a step of the compiled program."""

    topology: str
    chips: int
    slices: int
    mesh: dict[str, int]
    hbm_bytes: int
    params_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    temp_bytes: int
    total_bytes: int  # arguments + outputs not aliased to them + temporaries
    compiled_flops_per_chip: float
    bytes_accessed_per_chip: float
    model_flops_per_step: float
    step_time_lower_bound_s: float  # the step's FLOPs (program_flops_per_step per chip, or more) at peak, or XLA's
    # roofline estimate where that is longer
    mfu_ceiling: float
    parameters: int
    scanned_layers: bool = False  # model.scan_layers: XLA's cost analysis counts the scanned layer once
    program_flops_per_step: float = 0.0  # every FLOP of the step's program, all chips (program_flops_per_step)
    lower_seconds: float = 0.0  # tracing and lowering the train step
    compile_seconds: float = 0.0  # XLA's compile of the lowered step for the topology
    host_peak_bytes: int = 0  # this process's peak resident memory by the end of the compile

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    @property
    def headroom(self) -> float:
        """The share of one chip's HBM the step leaves free (negative when it does not fit)."""
        return 1.0 - self.total_bytes / self.hbm_bytes


# Variables libtpu sets in the C environment while it compiles (so child processes inherit them, unseen by
# os.environ); left behind, they make `distributed` take this machine for a Cloud TPU host.
LIBTPU_ENVIRONMENT = ("CLOUD_TPU_TASK_ID", "CLOUD_TPU_ACCELERATOR_TYPE", "TPU_PREMAPPED_BUFFER_SIZE")


def compile_check(config: Config, topology_name: str) -> Report:
    """Compiles `config`'s train step for the topology (times prod(mesh.dcn_shape) slices) and reports."""
    users = {key for key in LIBTPU_ENVIRONMENT if key in os.environ}
    try:
        return _compile_check(config, topology_name)
    finally:
        if not _on_tpu_vm():
            for key in set(LIBTPU_ENVIRONMENT) - users:
                os.environ.pop(key, None)
                os.unsetenv(key)


def _compile_check(config: Config, topology_name: str) -> Report:
    config = peft.resolve(config)  # as `crosswrite train` does: LoRA adapters or a soft prompt where asked
    topology = parse_topology(topology_name)
    slices = math.prod(abs(s) for s in config.mesh.dcn_shape)
    devices = topology_devices(topology, slices)
    mesh = sharding.make_mesh(config.mesh.shape, devices, dcn_shape=config.mesh.dcn_shape)
    ways = sharding.data_parallel_size(mesh)
    if config.train.batch_size % ways:
        raise UserError(f"config key 'train.batch_size' ({config.train.batch_size}) must be a multiple of the "
                        f"data-parallel size {ways} on {topology_name} (mesh {dict(mesh.shape)})")
    trainer = Trainer.build(config, mesh)
    state = trainer.layout.abstract_with_shardings()
    batch = abstract_batch(config, mesh)
    params_bytes = per_chip_bytes(trainer.layout.abstract.params, trainer.layout.shardings.params)
    optimizer_bytes = per_chip_bytes(trainer.layout.abstract.opt_state, trainer.layout.shardings.opt_state)
    with trainer.context():
        started = time.perf_counter()
        lowered = trainer.jit_train_step().lower(state, batch)
        lowered_at = time.perf_counter()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as error:  # XLA refuses a program that cannot fit in HBM
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            raise UserError(f"does not fit: {topology.libtpu_name} with mesh {dict(mesh.shape)}: "
                            f"{_out_of_memory(error)}; params {params_bytes / GiB:.2f} GiB and optimizer state "
                            f"{optimizer_bytes / GiB:.2f} GiB per chip. {_ADVICE}") from None
    compile_seconds = time.perf_counter() - lowered_at
    memory = compiled.memory_analysis()
    cost = cost_analysis(compiled)
    chips = len(devices)
    model_flops, program_flops = model_flops_per_step(config), program_flops_per_step(config)
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    # The compiled count misses all but one pass of each loop (scanned layers, microbatches, logits chunks): the
    # whole program's FLOPs, shared over the chips, bound the step where more (the model's where XLA gave none).
    bound_flops = max(flops, (program_flops or model_flops) / chips)
    # XLA's own roofline estimate of the step, where it gives one; never below the FLOPs at peak rate.
    lower_bound = max(bound_flops / topology.chip.peak_flops, float(cost.get("optimal_seconds", 0.0)), 1e-12)
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes \
        + memory.temp_size_in_bytes
    return Report(
        topology=topology.libtpu_name + (f" x {slices} slices" if slices > 1 else ""), chips=chips, slices=slices,
        mesh=dict(mesh.shape), hbm_bytes=topology.chip.hbm_bytes,
        params_bytes=params_bytes, optimizer_bytes=optimizer_bytes,
        batch_bytes=per_chip_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        temp_bytes=int(memory.temp_size_in_bytes), total_bytes=int(total), compiled_flops_per_chip=flops,
        bytes_accessed_per_chip=accessed, model_flops_per_step=model_flops, step_time_lower_bound_s=lower_bound,
        mfu_ceiling=min(model_flops / (chips * topology.chip.peak_flops * lower_bound), 1.0),
        parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.layout.abstract.params)),
        scanned_layers=config.model.scan_layers, program_flops_per_step=program_flops,
        lower_seconds=lowered_at - started, compile_seconds=compile_seconds,
        host_peak_bytes=peak_host_bytes())


def format_report(report: Report) -> str:
    """A few aligned lines for the terminal."""
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    rows = [
        ("topology", f"{report.topology}: {report.chips} chips, mesh {report.mesh}"),
        ("parameters", f"{report.parameters / 1e9:.3f} B"),
        ("per chip: params", gib(report.params_bytes)),
        ("per chip: optimizer", gib(report.optimizer_bytes)),
        ("per chip: batch", gib(report.batch_bytes)),
        ("per chip: temporaries", gib(report.temp_bytes)),
        ("per chip: total", f"{gib(report.total_bytes)} of {gib(report.hbm_bytes)} HBM "
                            f"({100 * report.total_bytes / report.hbm_bytes:.0f}%, headroom "
                            f"{100 * report.headroom:.0f}%)"),
        ("model FLOPs", f"{report.model_flops_per_step:.3e} per step, all chips (flops.step_flops: matmuls, "
                        f"forward and backward)"),
        ("step FLOPs", f"{report.program_flops_per_step:.3e} per step, all chips (XLA's count of the step without "
                       f"loops; {report.program_flops_per_step / max(report.model_flops_per_step, 1):.2f} x model)"),
        ("compiled FLOPs / chip", f"{report.compiled_flops_per_chip:.3e} per step (XLA"
                                  f"{', the scanned layer counted once' if report.scanned_layers else ''})"),
        ("step time >=", f"{report.step_time_lower_bound_s * 1e3:.1f} ms (the step's FLOPs per chip at peak, or "
                         f"XLA's roofline estimate)"),
        ("MFU ceiling", f"{100 * report.mfu_ceiling:.1f}% (model FLOPs in that time at peak)"),
        ("compile", f"{report.lower_seconds:.1f} s lowering + {report.compile_seconds:.1f} s XLA compile; host "
                    f"peak {report.host_peak_bytes / 1e9:.1f} GB"),
    ]
    return "\n".join(f"{name:24s}{value}" for name, value in rows)


_ADVICE = "Lower train.batch_size, shard more (mesh.shape, mesh.rules) or take a larger slice"


def check_fits(report: Report) -> None:
    """UserError (exit 2) when one chip would need more than its HBM."""
    if not report.fits:
        raise UserError(
            f"does not fit: {report.total_bytes / GiB:.2f} GiB per chip on {report.topology} exceeds its "
            f"{report.hbm_bytes / GiB:.0f} GiB HBM (params {report.params_bytes / GiB:.2f}, optimizer "
            f"{report.optimizer_bytes / GiB:.2f}, temporaries {report.temp_bytes / GiB:.2f} GiB). {_ADVICE}")


def _out_of_memory(error: Exception) -> str:
    """XLA's out-of-memory sentence, without the status code and the buffer listing after it."""
    lines = [line for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line] or [_first_line(error)]
    sentence = lines[0].split("RESOURCE_EXHAUSTED: ", 1)[-1].split(". ", 1)[0]
    return sentence.rstrip(".")[:300]


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__

