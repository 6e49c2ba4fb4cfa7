"""Several processes on one machine: the pod code path (jax.distributed over gloo), on CPU.

Two `crosswrite train` processes with 4 CPU devices each (mesh (-1, 1, 1) over 8 global devices) train the
tiny quickstart model with a checkpoint; one process with one device then restores it, and the numbers must
match. Killing one process must stop the other with an error, never leave it hanging.

    python -m pytest -m slow -n 0 tests/test_multihost.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import QUICKSTART, ROOT, TINY_OVERRIDES, assert_trees_equal, tiny_config

from crosswrite_jax import checkpoint, integrity, sharding, supervise
from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.batches import validation_batches
from crosswrite_jax.config import DistributedConfig
from crosswrite_jax.distributed import detect_cluster, initialize_arguments
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import held_out_loss
from crosswrite_jax.train import train
from crosswrite_jax.trainer import Trainer

STEPS = 4
RUN = {"train.steps": STEPS, "train.log_every": 2, "train.eval_every": STEPS, "train.eval_batches": 2,
       "checkpoint.every": STEPS}
LOCAL_MULTIHOST = ROOT / "launch" / "local_multihost.sh"


def _cli_overrides(values: dict) -> list[str]:
    return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seeded_workdir(path: Path, overrides: dict) -> Path:
    """A run directory holding the tokenizer already, so that no process has to train (and write) one."""
    workdir_lib.prepare(tiny_config(**{k.replace(".", "__"): v for k, v in overrides.items()}), path)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSWRITE_")}
    env.update(JAX_PLATFORMS="cpu", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _last_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, text[-2000:]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_two_processes_train_and_one_device_restores_the_same_numbers(tmp_path):
    workdir = _seeded_workdir(tmp_path / "pod", RUN)
    env = _env(DEVICES_PER_PROCESS="4", CROSSWRITE=f"{sys.executable} -m crosswrite_jax.cli")
    started = time.perf_counter()
    done = subprocess.run(["bash", str(LOCAL_MULTIHOST), "2", str(QUICKSTART), str(workdir),
                           *_cli_overrides(dict(TINY_OVERRIDES, **RUN))],
                          capture_output=True, text=True, env=env, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:] + (workdir / "logs" / "process_1.log").read_text()[-3000:]
    pod = _last_json(done.stdout)
    assert "process 0 of 2; 8 devices in all, 4 here" in done.stderr
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in done.stderr
    other = (workdir / "logs" / "process_1.log").read_text()
    assert "parameters:" not in other and '"command": "train"' not in other  # process 1 reports nothing
    print(f"two processes: {time.perf_counter() - started:.1f}s")

    step_dir = workdir / "checkpoints" / str(STEPS)
    assert integrity.verify_step(step_dir, strict=True) == []  # committed, with process 0's manifest

    config = workdir_lib.load_run(workdir).config
    one = Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    eight = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
    on_one, on_eight = (_restore_params(workdir, t) for t in (one, eight))
    assert {d for leaf in jax.tree.leaves(on_one) for d in leaf.devices()} == {jax.devices()[0]}
    assert_trees_equal(on_one, on_eight)

    # The same held-out batches, teacher-forced on one device: the loss the two processes reported.
    run = workdir_lib.load_run(workdir)
    with one.context():
        val = held_out_loss(one.jit_eval_step(), on_one, validation_batches(run, one.task), one.mesh)
    np.testing.assert_allclose(val["loss"], pod["val_loss"], rtol=1e-5)
    assert val["tokens"] == pod["val_tokens"]

    # One process over the same 8 devices trains to the same parameters: each process read its own rows.
    single = tmp_path / "single"
    shutil.copytree(workdir / workdir_lib.TOKENIZER, single / workdir_lib.TOKENIZER)
    train(config, single)
    trained = _restore_params(single, eight)
    for a, b in zip(jax.tree.leaves(jax.device_get(on_eight)), jax.tree.leaves(jax.device_get(trained))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _restore_params(workdir: Path, trainer: Trainer):
    manager = checkpoint.open_manager(workdir / "checkpoints", read_only=True)
    try:
        params, _, step = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
    finally:
        manager.close()
    assert step == STEPS
    return params


@pytest.mark.slow
def test_killed_process_stops_the_other_within_the_heartbeat_timeout(tmp_path):
    workdir = _seeded_workdir(tmp_path / "pod", {})
    processes = _start_two_processes(workdir, {"distributed.heartbeat_timeout": 5})
    try:
        _wait_for_training(workdir / "metrics.jsonl", processes, timeout_s=240)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            _, stderr = processes[0].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still runs 60 s after process 1 was killed (heartbeat timeout 5 s)")
        waited = time.monotonic() - killed
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    # Whichever notices first stops it (gloo's collective on the dead peer, or the coordination service's
    # heartbeat), the watched child's native abort becomes one line naming the lost process, and exit 75.
    assert processes[0].returncode == supervise.EXIT_PEER_LOST, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("crosswrite:")]
    assert len(errors) == 1 and "process 0 of 2 lost process 1" in errors[0], stderr[-3000:]
    assert "terminate called" not in stderr and "Check failure" not in stderr
    assert waited < 60
    print(f"process 0 stopped {waited:.1f}s after process 1 was killed")


def _start_two_processes(workdir: Path, overrides: dict) -> list[subprocess.Popen]:
    """Two `crosswrite train` processes of 4 CPU devices each, joined on a free local port, training endlessly."""
    port = _free_port()
    args = [sys.executable, "-m", "crosswrite_jax.cli", "train", "--config", str(QUICKSTART), "--workdir",
            str(workdir), *_cli_overrides(dict(TINY_OVERRIDES, **{"train.steps": 100000, "train.log_every": 1,
                                                                   "checkpoint.every": 100000, **overrides}))]
    return [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                      CROSSWRITE_COORDINATOR=f"127.0.0.1:{port}",
                                      CROSSWRITE_NUM_PROCESSES="2", CROSSWRITE_PROCESS_ID=str(i)))
            for i in range(2)]


def _wait_for_training(metrics: Path, processes: list[subprocess.Popen], timeout_s: float) -> None:
    """Until process 0 has logged a training step; fails when a process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.exists() and '"split": "train"' in metrics.read_text():
            return
        for i, process in enumerate(processes):
            if process.poll() is not None:
                pytest.fail(f"process {i} exited ({process.returncode}) before training: "
                            f"{process.communicate()[1][-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no training step logged within {timeout_s} s")


# Fast: how the processes are found, without starting any.

def test_single_process_needs_no_initialization():
    assert initialize_arguments(DistributedConfig(), environ={}) is None
    assert initialize_arguments(DistributedConfig(num_processes=1), environ={"SLURM_JOB_ID": "1",
                                                                           "SLURM_NTASKS": "4"}) is None


def test_explicit_processes_from_config_or_environment():
    explicit = initialize_arguments(DistributedConfig(coordinator_address="10.0.0.2:1234", num_processes=4,
                                                      process_id=3, heartbeat_timeout=7), environ={})
    assert explicit == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                        "initialization_timeout": 300, "heartbeat_timeout_seconds": 7}
    env = {"CROSSWRITE_COORDINATOR": "host:99", "CROSSWRITE_NUM_PROCESSES": "2", "CROSSWRITE_PROCESS_ID": "1"}
    assert initialize_arguments(DistributedConfig(), environ=env)["process_id"] == 1
    # Keys set in the config win over the environment.
    assert initialize_arguments(DistributedConfig(process_id=0), environ=env)["process_id"] == 0


@pytest.mark.parametrize("environ, cluster", [
    ({"TPU_WORKER_ID": "3"}, "cloud_tpu"), ({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, "cloud_tpu"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, "slurm"), ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, ""),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"), ({}, ""),
    # What libtpu leaves behind on a machine without TPUs (inherited by child processes): not a TPU host.
    ({"TPU_WORKER_HOSTNAMES": "WARNING: could not determine TPU worker hostnames or IP addresses, please set env var "
      "`TPU_WORKER_HOSTNAMES` manually", "TPU_ACCELERATOR_TYPE": "WARNING: could not determine TPU accelerator type"},
     ""),
])
def test_detected_clusters_initialize_without_addresses(environ, cluster):
    assert detect_cluster(environ) == cluster
    arguments = initialize_arguments(DistributedConfig(heartbeat_timeout=9), environ=environ)
    if cluster:
        assert arguments == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 9}
    else:
        assert arguments is None


@pytest.mark.parametrize("config, environ, message", [
    (DistributedConfig(num_processes=2), {}, "need all of distributed.coordinator_address"),
    (DistributedConfig(coordinator_address="10.0.0.2", num_processes=2, process_id=0), {}, "must be HOST:PORT"),
    (DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2), {}, r"outside \[0, 2\)"),
    (DistributedConfig(process_id=1), {}, "no cluster was detected"),
    (DistributedConfig(), {"CROSSWRITE_NUM_PROCESSES": "two"}, r"\$CROSSWRITE_NUM_PROCESSES is 'two'"),
    (DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=0, heartbeat_timeout=0), {},
     "heartbeat_timeout must be a positive"),
])
def test_bad_distributed_settings_name_the_key(config, environ, message):
    with pytest.raises(UserError, match=message):
        initialize_arguments(config, environ=environ)


def test_cli_rejects_bad_distributed_settings_in_one_line(tmp_path):
    from crosswrite_jax.cli import main

    code = main(["train", "--config", str(QUICKSTART), "--workdir", str(tmp_path / "w"),
                 "--config.distributed.num_processes=2"])
    assert code == 2


# The hybrid (multi-slice) mesh layout, on stand-in devices: CPUs have no slice_index.

class _Device:
    platform = device_kind = "cpu"

    def __init__(self, id: int, slice_index: int | None, process_index: int):
        self.id, self.slice_index, self.process_index = id, slice_index, process_index

    def __repr__(self):
        return f"D{self.id}"


def test_hybrid_mesh_puts_slices_along_the_dcn_axes():
    from crosswrite_jax.sharding import hybrid_device_array

    devices = [_Device(i, slice_index=i // 4, process_index=i // 2) for i in range(8)]
    grid = hybrid_device_array((1, -1, 1), (2, 1, 1), devices)
    assert grid.shape == (2, 4, 1)
    assert [[d.slice_index for d in row.flat] for row in grid] == [[0] * 4, [1] * 4]
    tensor_across = hybrid_device_array((2, 1, -1), (1, 1, 2), devices)  # slices along tensor: (2, 1, 2x2)
    assert tensor_across.shape == (2, 1, 4)
    assert [d.slice_index for d in tensor_across[0, 0]] == [0, 0, 1, 1]


def test_hybrid_mesh_without_slice_index_counts_processes():
    from crosswrite_jax.sharding import hybrid_device_array

    devices = [_Device(i, slice_index=None, process_index=i // 4) for i in range(8)]
    grid = hybrid_device_array((-1, 1, 1), (-1, 1, 1), devices)
    assert grid.shape == (8, 1, 1) and [d.process_index for d in grid.flat] == [0] * 4 + [1] * 4


@pytest.mark.parametrize("shape, dcn, message", [
    ((-1, 1, 1), (3, 1, 1), r"'mesh.dcn_shape' \(3, 1, 1\) needs 3 slices but 2 are present"),
    ((3, 1, 1), (2, 1, 1), r"'mesh.shape' \(3, 1, 1\) needs 3 devices per slice but 4 are present"),
    ((-1, 1, 1), (2, 1), "needs 3 positive sizes"),
])
def test_hybrid_mesh_shape_errors_name_the_key(shape, dcn, message):
    from crosswrite_jax.sharding import hybrid_device_array

    devices = [_Device(i, slice_index=i // 4, process_index=i // 4) for i in range(8)]
    with pytest.raises(UserError, match=message):
        hybrid_device_array(shape, dcn, devices)


def test_single_slice_dcn_shape_keeps_the_plain_mesh():
    assert sharding.make_mesh((-1, 1, 1), dcn_shape=(1, 1, 1)).devices.tolist() == \
        sharding.make_mesh((-1, 1, 1)).devices.tolist()


def test_one_process_initializes_nothing():
    from crosswrite_jax.distributed import initialize, is_main_process

    assert initialize(DistributedConfig(), environ={}) is False
    assert is_main_process()


@pytest.mark.slow
def test_sigterm_on_every_host_saves_one_agreed_step_and_exits_zero(tmp_path):
    workdir = _seeded_workdir(tmp_path / "pod", {})
    processes = _start_two_processes(workdir, {})
    try:
        _wait_for_training(workdir / "metrics.jsonl", processes, timeout_s=240)
        for process in processes:  # a pod's maintenance event signals every host
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    stopped = _last_json(outputs[0][0])["preempted_at"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stopped]  # one step, agreed by both processes, fully written
