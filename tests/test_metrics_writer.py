"""metrics.jsonl and TensorBoard events, written without importing torch into the training process."""

import importlib.util
import json
import subprocess
import sys

PROBE = """
import json, sys
from pathlib import Path
if sys.argv[2] == "1":
    import torch
from crosswrite_jax.reporting import MetricsWriter

writer = MetricsWriter(Path(sys.argv[1]))
writer.write(3, "train", {"loss": 1.5, "note": "text"})
writer.close()
print(json.dumps({"torch_loaded": "torch" in sys.modules}))
import torch  # importable afterwards: the writer hid it only while tensorboardX loaded
"""


def _probe(tmp_path, preload_torch: bool) -> dict:
    """Writes one record in a fresh interpreter; whether torch is loaded afterwards."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), "1" if preload_torch else "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_metrics_writer_does_not_import_torch_and_still_writes_events(tmp_path):
    assert importlib.util.find_spec("torch") is not None  # the test extra installs torch: the probe means something
    result = _probe(tmp_path, preload_torch=False)
    assert result["torch_loaded"] is False
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 3, "split": "train", "loss": 1.5, "note": "text"}]
    events = list((tmp_path / "tensorboard").iterdir())
    assert events and events[0].stat().st_size > 0


def test_metrics_writer_works_when_torch_is_already_loaded(tmp_path):
    result = _probe(tmp_path, preload_torch=True)
    assert result["torch_loaded"] is True  # loaded by the probe itself; the writer must still work beside it
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
