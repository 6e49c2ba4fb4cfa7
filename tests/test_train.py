"""The sharded train step: same numbers on any mesh; freezing keeps values and holds no moments."""

import logging

import jax
import numpy as np
import pytest
from conftest import assert_trees_equal, tiny_config

from crosswrite_jax import sharding
from crosswrite_jax.errors import UserError
from crosswrite_jax.optim import tree_bytes
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.trainer import Trainer


def _batches(vocab: int, n: int, batch: int = 16, length: int = 16):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        inputs = rng.integers(3, vocab, (batch, length), dtype=np.int32)
        targets = rng.integers(3, vocab, (batch, length), dtype=np.int32)
        inputs[:, 12:] = 0  # padding
        targets[::2, 10:] = 0
        out.append({"inputs": inputs, "targets": targets})
    return out


def _run(trainer: Trainer, batches):
    state = trainer.init_state()
    step = trainer.jit_train_step()
    losses = []
    with trainer.context():
        for batch in batches:
            state, metrics = step(state, to_global_batch(batch, trainer.mesh))
            losses.append(float(metrics["loss_sum"] / metrics["tokens"]))
    return state, losses


@pytest.mark.parametrize("preset", ["fsdp_tp", "data_parallel"])
def test_sharded_step_matches_one_device(preset):
    config = tiny_config(mesh__rules=preset)
    batches = _batches(config.model.vocab_size, 3)
    sharded, sharded_losses = _run(Trainer.build(config, sharding.make_mesh((2, 2, 2))), batches)
    single, single_losses = _run(Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1])), batches)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    assert sharded_losses[-1] < sharded_losses[0]  # it trains
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)), jax.tree.leaves(jax.device_get(single.params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two PRNGs x two meshes: four compiles with dropout
def test_dropout_masks_follow_the_configured_prng_and_not_the_mesh():
    """threefry4x32 (the default) and threefry2x32 draw mesh-independent masks; the setting changes the masks."""
    batches = _batches(tiny_config().model.vocab_size, 2)
    losses = {}
    for impl in ("threefry4x32", "threefry2x32"):
        config = tiny_config(model__dropout_rate=0.1, train__dropout_rng=impl)
        _, sharded = _run(Trainer.build(config, sharding.make_mesh((2, 2, 2))), batches)
        _, single = _run(Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1])), batches)
        np.testing.assert_allclose(sharded, single, rtol=1e-5)
        losses[impl] = single
    _, plain = _run(Trainer.build(tiny_config(), sharding.make_mesh((1, 1, 1), jax.devices()[:1])), batches)
    # Dropout is active under either PRNG, and the two draw different masks.
    assert losses["threefry4x32"][0] != pytest.approx(plain[0], rel=1e-4)
    assert losses["threefry4x32"][0] != pytest.approx(losses["threefry2x32"][0], rel=1e-4)


def test_frozen_subtree_is_bit_identical_and_has_no_moments():
    config = tiny_config(optimizer__freeze=("encoder/.*", "embed/.*"), optimizer__weight_decay=0.1)
    trainer = Trainer.build(config, sharding.make_mesh((2, 2, 2)))
    initial = jax.device_get(trainer.init_state().params)
    final, _ = _run(trainer, _batches(config.model.vocab_size, 5))
    final = jax.device_get(final.params)
    assert_trees_equal(final["encoder"], initial["encoder"])
    assert_trees_equal(final["embed"], initial["embed"])
    changed = final["decoder"]["layer_0"]["mlp"]["wi"]["kernel"] != initial["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert changed.all()

    unfrozen = Trainer.build(tiny_config(optimizer__weight_decay=0.1), sharding.make_mesh((2, 2, 2)))
    frozen_bytes = tree_bytes(initial["encoder"]) + tree_bytes(initial["embed"])
    # Adam keeps two moments (mu, nu) per trainable parameter; frozen ones keep none.
    assert tree_bytes(unfrozen.layout.abstract.opt_state) - tree_bytes(trainer.layout.abstract.opt_state) \
        == 2 * frozen_bytes
    report = trainer.parameter_report()
    assert report["frozen"] * 4 == frozen_bytes
    assert report["trainable"] + report["frozen"] == report["total"]


def test_freeze_pattern_matching_nothing_is_an_error():
    with pytest.raises(UserError, match="'encodr/.*' matches no parameter"):
        Trainer.build(tiny_config(optimizer__freeze=("encodr/.*",)), sharding.make_mesh((-1, 1, 1)))


def test_training_logs_model_flops_and_its_compiles(tmp_path, caplog):
    from crosswrite_jax import flops
    from crosswrite_jax.reporting import read_metrics
    from crosswrite_jax.train import train

    config = tiny_config(train__steps=4, train__log_every=2, data__packing=True, data__max_source_length=32,
                         data__max_target_length=32)
    with caplog.at_level(logging.INFO, logger="crosswrite"):
        train(config, tmp_path / "run")
    summary, = [r for r in read_metrics(tmp_path / "run") if r["split"] == "summary"]
    assert summary["compiled_programs"] > 1 and summary["compile_seconds"] > 0  # init and the train step at least
    assert f"compiled {summary['compiled_programs']} programs in {summary['compile_seconds']:.1f} s" in caplog.text
    phases = summary["phase_seconds"]  # the start-up and finish breakdown (docs/PERFORMANCE.md)
    assert list(phases) == ["imports", "run_directory", "model", "data", "parameters", "validation_setup",
                            "first_step", "steps", "finish"]
    assert min(phases.values()) >= 0 and phases["first_step"] > 0 and phases["imports"] > 0
    assert sum(v for k, v in phases.items() if k != "imports") == pytest.approx(summary["seconds"], abs=0.2)
    assert "wall time by phase: imports" in caplog.text
    records = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(records) == 2
    batch = {"inputs": np.zeros((16, 32), np.int32), "targets": np.zeros((16, 32), np.int32)}  # one packed shape
    per_step = flops.training_flops(config.model, batch)
    for record in records:
        assert record["model_flops_per_second"] == pytest.approx(per_step * record["steps_per_second"], rel=1e-3)
        assert record["mfu"] == pytest.approx(record["model_flops_per_second"] / 1e11, rel=0.01, abs=1e-5)
    assert summary["mfu"] == records[-1]["mfu"] and summary["peak_source"] == "CROSSWRITE_PEAK_FLOPS"
    assert f"MFU {100 * summary['mfu']:.1f}% (the last 2 steps' model FLOP/s over 100.0 GFLOP/s" in caplog.text


def test_the_host_peak_is_measured_once_in_a_subprocess_kept_and_read(tmp_path, monkeypatch):
    from crosswrite_jax import flops

    monkeypatch.delenv(flops.PEAK_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert flops.known_host_peak() == (None, None)
    peak = flops.measure_host_peak(size=256)
    assert 1e8 < peak < 1e14 and flops.host_peak_path().is_relative_to(tmp_path / "cache")
    kept, source = flops.known_host_peak()
    assert kept == peak and source.startswith("measured f32 matmul on this host (")
    monkeypatch.setenv(flops.PEAK_ENV, "fast")
    with pytest.raises(UserError, match="CROSSWRITE_PEAK_FLOPS must be a number"):
        flops.known_host_peak()


def test_a_cpu_run_without_a_known_peak_measures_it_at_the_end(tmp_path, monkeypatch):
    from crosswrite_jax import flops
    from crosswrite_jax.reporting import read_metrics
    from crosswrite_jax.train import train

    monkeypatch.delenv(flops.PEAK_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(flops, "measure_host_peak", lambda: measured.append(1) or 5e10)
    train(tiny_config(train__steps=2, train__log_every=1), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    summary, = [r for r in records if r["split"] == "summary"]
    last = [r for r in records if r["split"] == "train"][-1]
    assert measured == [1] and "mfu" not in last  # the progress line had no peak; the summary has
    assert summary["mfu"] == pytest.approx(last["model_flops_per_second"] / 5e10, rel=0.01, abs=1e-5)
    assert summary["peak_source"].endswith("(just now)")
