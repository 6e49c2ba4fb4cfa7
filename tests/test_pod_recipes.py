"""Pod recipes load and have their models' sizes; compile-check parses TPU slices and compiles for one (libtpu)."""

from __future__ import annotations

import math

import jax
import pytest
from conftest import ROOT, tiny_config

from crosswrite_jax import compile_check as cc
from crosswrite_jax import config as config_lib
from crosswrite_jax import sharding
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import param_shapes

# Published sizes: T5 v1.1 base / large / XL (untied output layer), Llama 3.2 1B (tied), Llama 3 8B.
RECIPES = {"t5_base_pod": (248e6, "span_corruption", "v5e-16"), "t5_large_pod": (783e6, "span_corruption", "v5e-64"),
           "t5_xl_pod": (2.85e9, "span_corruption", "v4-128"), "llama_1b_pod": (1.24e9, "causal_lm", "v5e-256"),
           "llama_8b_pod": (8.03e9, "causal_lm", "v5p-256")}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pod_recipe_loads_with_its_size_class(name):
    size, task, topology = RECIPES[name]
    path = ROOT / "configs" / f"{name}.py"
    config = config_lib.load(path)
    assert config.task == task and config.model.dtype == "bfloat16" and config.model.scan_layers
    assert config.data.sources and all(s.startswith("tfds:c4/en:3.1.0?split=train") for s in config.data.sources)
    parameters = sum(math.prod(s) for s in param_shapes(config.model).values())
    assert abs(parameters - size) / size < 0.10, f"{name}: {parameters:,}"
    docstring = path.read_text()
    assert "launch/tpu_pod.sh" in docstring and f"--topology {topology}" in docstring
    # The mesh divides the slice it targets, and the batch divides over its data-parallel ways.
    chips = cc.parse_topology(topology).chips
    shape = sharding.resolve_mesh_shape(config.mesh.shape, chips)
    assert config.train.batch_size % (shape[0] * shape[1]) == 0


@pytest.mark.parametrize("name, generation, grid", [
    ("v5e-256", "v5e", (16, 16)), ("v5litepod-16", "v5e", (4, 4)), ("v5e-8", "v5e", (2, 4)),
    ("v5litepod-1", "v5e", (1, 1)), ("v4-8", "v4", (2, 2, 1)), ("v4-128", "v4", (4, 4, 4)),
    ("v4-256", "v4", (4, 4, 8)), ("v5p-256", "v5p", (4, 4, 8)), ("v5p-2048", "v5p", (8, 8, 16)),
    ("v6e-64", "v6e", (8, 8)), ("v5e:2x2", "v5e", (2, 2)), ("V4:2x2x2", "v4", (2, 2, 2)),
])
def test_topology_names(name, generation, grid):
    topology = cc.parse_topology(name)
    assert topology.chip.generation == generation and topology.grid == grid


@pytest.mark.parametrize("name, message", [
    ("v3-8", "not a TPU slice this knows"), ("tpu", "not a TPU slice"), ("v5e-12", "12 chips is not a slice size"),
    ("v4-7", "TensorCores"), ("v5e:2x2x2", "a v5e grid has 2 sizes"),
])
def test_bad_topology_names(name, message):
    with pytest.raises(UserError, match=message):
        cc.parse_topology(name)


def test_hbm_and_peak_per_generation():
    assert {g: c.hbm_bytes // cc.GiB for g, c in cc.CHIPS.items()} == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
    assert cc.CHIPS["v5e"].peak_flops == 197e12


def test_abstract_batch_has_the_pipelines_keys():
    mesh = sharding.make_mesh((-1, 1, 1))
    translation = cc.abstract_batch(tiny_config(data__packing=True), mesh)
    assert sorted(translation) == ["inputs", "inputs_positions", "inputs_segments", "targets", "targets_positions",
                                   "targets_segments"]
    assert translation["inputs"].shape == (16, 32) and translation["inputs"].sharding == sharding.batch_sharding(mesh)
    llama = config_lib.load(ROOT / "configs" / "llama_1b_pod.py")
    assert {k: v.shape for k, v in cc.abstract_batch(llama, mesh).items()} == {
        k: (256, 2048) for k in ("targets", "targets_segments", "targets_positions")}


def test_model_flops_match_six_n_t_for_a_decoder():
    config = config_lib.load(ROOT / "configs" / "llama_8b_pod.py")
    shapes = param_shapes(config.model)
    tokens = config.train.batch_size * config.data.max_source_length
    matmul_params = sum(math.prod(s) for p, s in shapes.items() if p.endswith("kernel"))
    dense = 6 * matmul_params * tokens
    flops = cc.model_flops_per_step(config)
    assert dense < flops < 1.3 * dense  # attention scores add the rest at 2k tokens


def test_without_libtpu_compile_check_says_how_to_get_it(monkeypatch):
    from jax._src import cloud_tpu_init

    monkeypatch.setattr(cloud_tpu_init, "get_tpu_library_path", lambda: None)
    with pytest.raises(UserError, match=r"pip install 'crosswrite-jax\[tpu-compile\]'"):
        cc.compile_check(tiny_config(), "v5e:2x2")


def test_does_not_fit_is_a_one_line_user_error():
    report = cc.Report(topology="v5e:2x2", chips=4, slices=1, mesh={}, hbm_bytes=16 * cc.GiB, params_bytes=cc.GiB,
                       optimizer_bytes=2 * cc.GiB, batch_bytes=0, temp_bytes=20 * cc.GiB, total_bytes=23 * cc.GiB,
                       compiled_flops_per_chip=1.0, bytes_accessed_per_chip=1.0, model_flops_per_step=1.0,
                       step_time_lower_bound_s=1.0, mfu_ceiling=0.5, parameters=1)
    with pytest.raises(UserError, match=r"does not fit: 23.00 GiB per chip on v5e:2x2 exceeds its 16 GiB HBM") as e:
        cc.check_fits(report)
    assert "\n" not in str(e.value)


# libtpu: compile for real TPU topologies on this CPU (pip install -e ".[tpu-compile]"; .ci/run does).

def _need_libtpu():
    pytest.importorskip("libtpu", reason="compile-check needs libtpu: pip install -e '.[tpu-compile]'")


@pytest.mark.slow
def test_compile_check_of_the_tiny_model_on_v5e_2x2(capsys):
    _need_libtpu()
    from crosswrite_jax.cli import main

    code = main(["compile-check", "--config", str(ROOT / "configs" / "quickstart.py"), "--topology", "v5e:2x2",
                 "--config.model.d_model=64", "--config.model.d_ff=128", "--config.model.num_encoder_layers=1",
                 "--config.model.num_decoder_layers=1", "--config.mesh.shape=1,-1,1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "v5e:2x2: 4 chips, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
    assert "of 16.00 GiB HBM" in out and "MFU ceiling" in out


@pytest.mark.slow
def test_compile_check_reports_shards_per_chip_and_refuses_what_does_not_fit():
    _need_libtpu()
    config = tiny_config(mesh__shape=(1, -1, 1))
    report = cc.compile_check(config, "v4-16")  # 8 chips, one device each (megacore)
    assert report.chips == 8 and report.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    from crosswrite_jax.trainer import Trainer

    abstract = Trainer.build(config, sharding.make_mesh((1, -1, 1))).layout.abstract
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
    assert whole / 8 <= report.params_bytes < whole  # fsdp: about an eighth of the parameters per chip
    assert report.compiled_flops_per_chip > 0 and 0 < report.mfu_ceiling <= 1 and report.fits

    huge = tiny_config(model__vocab_size=262144, model__d_model=4096, model__d_ff=4096, train__batch_size=256,
                       model__max_length=256, data__max_source_length=256, data__max_target_length=256,
                       data__bucket_lengths=(256,))
    with pytest.raises(UserError, match="does not fit: v5e:2x2"):
        cc.compile_check(huge, "v5e:2x2")


@pytest.mark.slow
def test_hybrid_mesh_over_two_slices():
    _need_libtpu()
    devices = cc.topology_devices(cc.parse_topology("v5e:2x2"), num_slices=2)
    mesh = sharding.make_mesh((1, -1, 1), devices, dcn_shape=(2, 1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for row, slice_index in zip(mesh.devices, (0, 1)):  # data runs across slices, fsdp within one
        assert {d.slice_index for d in row.flat} == {slice_index}
    with pytest.raises(UserError, match="mesh.dcn_shape.*needs 3 slices but 2 are present"):
        sharding.make_mesh((1, -1, 1), devices, dcn_shape=(3, 1, 1))


BUNDLED_TEXT = ROOT / "crosswrite_jax" / "data" / "multi30k_sample" / "train.en.gz"
DERIVED_STEPS = 30


def tiny_derivative(name: str) -> config_lib.Config:
    """A pod recipe with a tiny model of its own family and layout, on bundled English text, for 30 steps: its
    optimizer, learning rate, schedule, mesh and dtype as they are, the warmup scaled to keep its share of the run."""
    config = config_lib.load(ROOT / "configs" / f"{name}.py")
    m, o = config.model, config.optimizer
    layers = {"model.num_encoder_layers": 2} if m.family == "encoder_decoder" else {}
    updates = {
        **layers, "model.num_decoder_layers": 2, "model.vocab_size": 512, "model.d_model": 64,
        "model.num_heads": 8, "model.num_kv_heads": 4 if m.num_kv_heads else 0, "model.head_dim": 8,
        "model.d_ff": 128, "model.max_length": 64,
        "data.sources": (f"text:{BUNDLED_TEXT}",), "data.eval_sources": (), "data.max_source_length": 64,
        "data.max_target_length": 16 if config.task == "span_corruption" else 64,
        "train.steps": DERIVED_STEPS, "train.batch_size": 16, "train.log_every": 1, "train.eval_every": 0,
        "checkpoint.every": 1000, "checkpoint.async_save": False,
        "optimizer.warmup_steps": max(1, round(o.warmup_steps * DERIVED_STEPS / config.train.steps)),
    }
    return config_lib.override(config, updates)


@pytest.mark.slow  # five short trainings on the 8 simulated devices
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_tiny_derivative_of_each_pod_recipe_trains_with_its_optimizer(name, tmp_path):
    from crosswrite_jax.reporting import read_metrics
    from crosswrite_jax.train import train

    config = tiny_derivative(name)
    recipe = config_lib.load(ROOT / "configs" / f"{name}.py")
    assert config.optimizer.name == ("adafactor" if name.startswith("t5") else "adamw")
    assert (config.optimizer.learning_rate, config.optimizer.schedule, config.mesh, config.model.dtype) == (
        recipe.optimizer.learning_rate, recipe.optimizer.schedule, recipe.mesh, recipe.model.dtype)
    train(config, tmp_path / name)
    losses = [r["loss"] for r in read_metrics(tmp_path / name) if r["split"] == "train"]
    assert len(losses) == DERIVED_STEPS and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, f"{name}: loss {first:.3f} over the first 5 steps, {last:.3f} over the last 5"
    print(f"{name}: loss {first:.3f} -> {last:.3f} over {DERIVED_STEPS} steps ({config.optimizer.name})")
