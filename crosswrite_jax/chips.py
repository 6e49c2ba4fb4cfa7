"""TPU generations: memory and dense bfloat16 peak per chip, and how their slices are named.

Read by compile_check (topologies, memory per chip) and flops (the MFU peak of a TPU run); imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3


@dataclass(frozen=True)
class Chip:
    """One TPU generation: memory and bf16 peak per chip, and how its slices are named."""

    generation: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s
    dims: int  # 2: a 2D torus (v5e, v6e); 3: a 3D torus (v4, v5p)
    cores_per_chip_in_name: int  # v4-8 and v5p-8 count TensorCores (4 chips); v5litepod-8 counts chips
    accelerator_type: str  # a single-host type libtpu accepts while it describes the topology


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 3, 2, "v4-8"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 2, 1, "v5litepod-4"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 3, 2, "v5p-8"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 2, 1, "v6e-4"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
