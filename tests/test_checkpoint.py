"""Orbax checkpoints: cross-mesh restore and bit-identical resume through the real training loop."""

import json

import jax
import numpy as np
from conftest import assert_trees_equal, tiny_config

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax.train import train
from crosswrite_jax.trainer import Trainer


def _restore_params_on(trainer: Trainer, directory):
    manager = checkpoint.open_manager(directory, read_only=True)
    params, _, _ = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
    manager.close()
    return params


def test_checkpoint_from_222_mesh_restores_on_8_and_on_one_device(tmp_path):
    config = tiny_config(mesh__rules="fsdp_tp")
    source = Trainer.build(config, sharding.make_mesh((2, 2, 2)))
    state = source.init_state()
    manager = checkpoint.open_manager(tmp_path, async_save=True)
    checkpoint.save(manager, state, {"note": "test"}, force=True)
    manager.wait_until_finished()
    manager.close()
    expected = jax.device_get(state.params)

    onto_8 = Trainer.build(config, sharding.make_mesh((8, 1, 1)))
    restored = _restore_params_on(onto_8, tmp_path)
    assert_trees_equal(restored, expected)
    leaf = restored["embed"]["token_embed"]["embedding"]
    assert leaf.sharding.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}

    onto_1 = Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    restored = _restore_params_on(onto_1, tmp_path)
    assert_trees_equal(restored, expected)
    assert restored["embed"]["token_embed"]["embedding"].sharding.device_set == {jax.devices()[0]}


def test_full_state_restore_includes_optimizer_and_step(tmp_path):
    config = tiny_config()
    workdir = tmp_path / "run"
    train(config, workdir, stop_at=3)
    trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
    manager = checkpoint.open_manager(workdir / "checkpoints", read_only=True)
    state, metadata = checkpoint.restore_state(manager, trainer.layout)
    manager.close()
    assert int(state.step) == 3 and metadata["data_index"] == 3
    mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2]
    assert mu and any(np.abs(np.asarray(x)).sum() > 0 for x in mu)  # moments were saved, not re-initialized


def _train_losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    config = tiny_config(train__steps=10, checkpoint__every=100)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, straight)
    train(config, resumed, stop_at=5)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == ["5"]
    train(config, resumed)

    def final_params(workdir):
        trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
        return _restore_params_on(trainer, workdir / "checkpoints")

    assert_trees_equal(final_params(resumed), final_params(straight))
    assert _train_losses(resumed) == _train_losses(straight)
    assert sorted(_train_losses(resumed)) == list(range(1, 11))
