"""Metric records: one JSON object per line in metrics.jsonl, mirrored as TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from crosswrite_jax.errors import UserError

log = logging.getLogger("crosswrite")


class MetricsWriter:
    """Appends `{"step", "split", ...}` records; a no-op on processes other than 0."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            workdir = Path(workdir)
            drop_torn_tail(workdir / "metrics.jsonl")
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            self._tensorboard = _summary_writer_class()(str(workdir / "tensorboard"), flush_secs=10)

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        """Records one set of scalars (non-numbers go to the JSON line only)."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch (imported here: only process 0 writes events).

    tensorboardX imports torch, where it is installed, only to accept torch tensors, which this writer never passes.
    That import costs seconds and puts a second native runtime into a JAX process, with its own exit-time teardown.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: numpy values unwrapped, floats rounded, NaN/inf as null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def drop_torn_tail(path: Path) -> None:
    """Cuts an unfinished last line (a run killed mid-write) so that appended records start on their own line."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            log.warning("%s: dropped an unfinished last line left by a stopped run", path)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl. A torn last line (what a killed run leaves) is skipped with a
    warning; a bad line anywhere else is an error naming FILE:LINE."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records = []
    for number, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "split" not in record or "step" not in record:
                raise ValueError("not a metrics record")
        except ValueError as error:
            if number == numbered[-1][0]:
                log.warning("%s:%d: skipped a torn last line (a run stopped mid-write)", path, number)
                break
            raise UserError(f"{path}:{number}: not a metrics record ({error}); remove the line or restore "
                            f"the file") from None
        records.append(record)
    return records
