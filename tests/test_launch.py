"""launch/tpu_pod.sh prints (in --dry-run) the gcloud commands of a pod run; bad arguments exit 2 in one line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

TPU_POD = ROOT / "launch" / "tpu_pod.sh"
LOCAL_MULTIHOST = ROOT / "launch" / "local_multihost.sh"
BASE = ["--name", "t5-base", "--zone", "us-west4-a", "--project", "my-project", "--accelerator", "v5litepod-16",
        "--config", "configs/t5_base_pod.py", "--workdir", "gs://my-bucket/runs/t5_base",
        "--repo", "https://example.com/crosswrite.git", "--ref", "main"]


def _no_gcloud_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment with a `gcloud` that fails if called (dry runs must not call it), no CROSSWRITE_TPU_*."""
    stub = tmp_path / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "gcloud").write_text("#!/bin/sh\necho 'gcloud was called' >&2\nexit 97\n")
    (stub / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSWRITE_TPU_")}
    return dict(env, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}", **extra)


@pytest.fixture
def tpu_pod(tmp_path):
    """Runs launch/tpu_pod.sh with the given arguments and environment additions."""

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(TPU_POD), *args], capture_output=True, text=True, cwd=ROOT,
                              env=_no_gcloud_env(tmp_path, **env), timeout=60)

    return run


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines()]


def _option(words: list[str], name: str) -> str:
    return next(w.split("=", 1)[1] for w in words if w.startswith(f"{name}="))


def test_dry_run_prints_create_install_train_and_delete(tpu_pod):
    done = tpu_pod(*BASE, "--dry-run", "--delete", "--config.train.steps=100")
    assert done.returncode == 0, done.stderr
    create, install, start, follow, delete = _commands(done.stdout)
    where = ["t5-base", "--zone=us-west4-a", "--project=my-project"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", *where, "--accelerator-type=v5litepod-16",
                      "--version=v2-alpha-tpuv5-lite"]
    assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *where] and "--worker=all" in install
    setup = _option(install, "--command")
    assert "git clone https://example.com/crosswrite.git" in setup and "checkout --quiet main" in setup
    assert "pip install" in setup and "-e '.[tfds]'" in setup and "'jax[tpu]==" in setup
    assert "gcsfuse --implicit-dirs my-bucket /mnt/gcs/my-bucket" in setup
    assert start[:8] == install[:8] and "--worker=all" in start
    assert ("crosswrite train --config configs/t5_base_pod.py --workdir /mnt/gcs/my-bucket/runs/t5_base "
            "--config.train.steps=100") in _option(start, "--command")
    assert "--worker=0" in follow and "crosswrite_train.log" in _option(follow, "--command")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", *where, "--quiet"]


def test_multislice_dry_run_creates_n_nodes_and_gives_each_its_megascale_slice(tpu_pod):
    done = tpu_pod(*BASE, "--queued", "--num-slices", "3", "--dry-run", "--delete", "--config.train.steps=100")
    assert done.returncode == 0, done.stderr
    commands = _commands(done.stdout)
    create = commands[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-count=3" in create and "--node-prefix=t5-base" in create
    assert not any(w.startswith("--node-id") for w in create)
    ssh = [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    installs, starts, follow = ssh[:3], ssh[3:6], ssh[6]
    assert [c[5] for c in installs] == [c[5] for c in starts] == ["t5-base-0", "t5-base-1", "t5-base-2"]
    for slice_id, start in enumerate(starts):
        script = _option(start, "--command")
        assert f"MEGASCALE_SLICE_ID={slice_id} " in script and "MEGASCALE_NUM_SLICES=3" in script
        assert "MEGASCALE_COORDINATOR_ADDRESS=SLICE0_WORKER0_IP:8080" in script
        assert "--config.train.steps=100 --config.mesh.dcn_shape=3,1,1" in script
    assert follow[5] == "t5-base-0" and "--worker=0" in follow
    assert commands[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]

    given = tpu_pod(*BASE, "--queued", "--num-slices=2", "--dry-run", "--config.mesh.dcn_shape=1,2,1")
    assert "--config.mesh.dcn_shape=1,2,1" in given.stdout and "dcn_shape=2,1,1" not in given.stdout


def test_dry_run_with_queued_spot_capacity_and_options_from_the_environment(tpu_pod):
    done = tpu_pod("--dry-run", "--queued", "--spot", "--delete", "--copy", "--config", "configs/llama_8b_pod.py",
                    "--workdir", "/data/runs/llama", CROSSWRITE_TPU_NAME="llama-8b", CROSSWRITE_TPU_ZONE="us-east5-a",
                    CROSSWRITE_TPU_ACCELERATOR="v5p-256")
    assert done.returncode == 0, done.stderr
    commands = _commands(done.stdout)
    assert commands[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "llama-8b",
                           "--zone=us-east5-a", "--node-id=llama-8b", "--accelerator-type=v5p-256",
                           "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert any(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in c for c in commands)
    train = next(c for c in commands if "--worker=all" in c and "crosswrite train" in " ".join(c))
    assert "--workdir /data/runs/llama" in _option(train, "--command")
    assert commands[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "llama-8b",
                            "--zone=us-east5-a", "--force", "--quiet"]


def test_delete_only(tpu_pod):
    done = tpu_pod("--dry-run", "--delete-only", "--name", "t5-base", "--zone", "us-west4-a")
    assert done.returncode == 0, done.stderr
    assert _commands(done.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "t5-base",
                                       "--zone=us-west4-a", "--quiet"]]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--dry-run"], "--name is required"),
    (["--name", "a", "--dry-run"], "--zone is required"),
    (["--name", "a", "--zone", "z", "--config", "configs/t5_base_pod.py", "--workdir", "w", "--dry-run"],
     "--accelerator is required"),
    (["--name", "a", "--zone", "z", "--accelerator", "tpu-16", "--dry-run"], "is not a TPU type"),
    (["--name", "A_b", "--zone", "z", "--dry-run"], "lowercase letters"),
    (["--name", "a", "--zone", "z", "--accelerator", "v5p-8", "--workdir", "w", "--dry-run"], "--config is required"),
    (["--name", "a", "--zone", "z", "--accelerator", "v5p-8", "--config", "configs/nope.py", "--workdir", "w",
      "--dry-run"], "config file 'configs/nope.py' not found"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--name"], "--name needs a value"),
    (["--name", "a", "--zone", "z", "--accelerator", "v5p-8", "--num-slices", "2", "--dry-run"], "add --queued"),
    (["--name", "a", "--zone", "z", "--num-slices", "0", "--dry-run"], "not a positive whole number"),
])
def test_bad_arguments_exit_2_with_one_line(tpu_pod, args, message):
    done = tpu_pod(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_train_command_survives_the_quoting(tpu_pod, tmp_path):
    """The start and follow commands run as a worker's shell would run them, with a fake `crosswrite`."""
    override = "--config.name=it's $HOME"
    done = tpu_pod(*BASE, "--dry-run", "--no-create", "--no-install", override)
    start, follow = _commands(done.stdout)
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "crosswrite" / ".venv" / "bin").mkdir(parents=True)
    (home / "crosswrite" / ".venv" / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    fake = bin_dir / "crosswrite"
    fake.write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(3)\n')
    fake.chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", "-c", _option(start, "--command")], env=env, check=True, timeout=30)
    deadline = time.monotonic() + 20
    while not (home / "crosswrite_train.status").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    tailed = subprocess.run(["bash", "-c", _option(follow, "--command")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert tailed.returncode == 3  # the training command's exit status comes back
    assert json.loads(tailed.stdout.strip().splitlines()[0]) == [
        "train", "--config", "configs/t5_base_pod.py", "--workdir", "/mnt/gcs/my-bucket/runs/t5_base", override]


@pytest.mark.parametrize("args, message", [
    ([], "usage: launch/local_multihost.sh N CONFIG WORKDIR"),
    (["two", "configs/quickstart.py", "w"], "N must be a positive whole number"),
    (["2", "configs/nope.py", "w"], "config file 'configs/nope.py' not found"),
])
def test_local_multihost_bad_arguments_exit_2(args, message):
    done = subprocess.run(["bash", str(LOCAL_MULTIHOST), *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
