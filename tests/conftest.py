"""Test setup: 8 simulated CPU devices, and tiny configs derived from the real recipes."""

import atexit
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One cold XLA cache per test session, never ~/.cache (test_cli checks it): tests that build the same tiny
    # model compile its programs once. Subprocesses and xdist workers inherit it; the session removes it.
    _CACHE = tempfile.mkdtemp(prefix="crosswrite-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _CACHE, True)

# Trained tokenizers are kept by their texts and settings: one cache per test session, never ~/.cache.
os.environ.setdefault("CROSSWRITE_TOKENIZER_CACHE", tempfile.mkdtemp(prefix="crosswrite-tests-tokenizers-"))
atexit.register(shutil.rmtree, os.environ["CROSSWRITE_TOKENIZER_CACHE"], True)
# Training on CPU reads the host's matmul peak for MFU (measured once, in a subprocess, when unknown): a fixed
# figure here keeps test runs from measuring it; test_train measures it into a temporary folder.
os.environ.setdefault("CROSSWRITE_PEAK_FLOPS", "1e11")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from crosswrite_jax import config as config_lib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.py"

TINY_OVERRIDES = {
    "model.vocab_size": 512, "model.d_model": 32, "model.num_heads": 4, "model.d_ff": 64,
    "model.num_encoder_layers": 1, "model.num_decoder_layers": 1, "model.max_length": 64,
    "data.packing": False, "data.bucket_lengths": (16, 32, 48), "data.max_source_length": 32,
    "data.max_target_length": 32,
    "train.batch_size": 16, "train.steps": 10, "train.log_every": 1, "train.eval_every": 0,
    "train.progress_bar": False, "optimizer.warmup_steps": 2, "checkpoint.every": 5,
    "checkpoint.async_save": False, "eval.batch_size": 16, "eval.max_examples": 24, "eval.max_decode_length": 12,
}


def tiny_config(**overrides) -> config_lib.Config:
    """The quickstart recipe shrunk to a model that trains in a second."""
    updates = dict(TINY_OVERRIDES)
    updates.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_lib.override(config_lib.load(QUICKSTART), updates)


@pytest.fixture(autouse=True)
def _no_tpu_variables_from_libtpu():
    """libtpu, once a compile-check test loads it here, writes placeholder TPU_* variables into this process's C
    environment; subprocesses started without env= would inherit them. Drop the ones os.environ never had."""
    yield
    from crosswrite_jax.distributed import TPU_ENV

    for name in TPU_ENV:
        if name not in os.environ:
            os.unsetenv(name)


@pytest.fixture
def tiny():
    return tiny_config


def restore_run(workdir):
    """(config, params) of a run directory's newest checkpoint, restored on one device."""
    from crosswrite_jax import checkpoint, sharding
    from crosswrite_jax.trainer import Trainer

    config = config_lib.load_json(Path(workdir) / "config.json")
    trainer = Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    manager = checkpoint.open_manager(Path(workdir) / "checkpoints", read_only=True)
    try:
        params, _, _ = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
    finally:
        manager.close()
    return config, params


def assert_trees_equal(a, b):
    """Bitwise equality of two pytrees of arrays."""
    import numpy as np

    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def replace(config, **sections):
    """dataclasses.replace for nested config sections."""
    return dataclasses.replace(config, **sections)
