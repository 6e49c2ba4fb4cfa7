"""The documented FLOPs formula against XLA's own count of the compiled program, for each family."""

import jax
import jax.numpy as jnp
import pytest

from crosswrite_jax import flops
from crosswrite_jax.models import presets
from crosswrite_jax.models.transformer import build_model, example_inputs
from crosswrite_jax.state import strip_boxes

SIZES = dict(vocab_size=1024, d_model=128, num_heads=4, d_ff=512, dropout_rate=0.0, max_length=64)
CONFIGS = {
    "bert-mlm": presets.bert(num_encoder_layers=2, head="mlm", **SIZES),
    "t5-v1.1": presets.t5("1.1", num_encoder_layers=2, num_decoder_layers=1, **SIZES),
    "llama-gqa": presets.llama(num_decoder_layers=2, num_kv_heads=2, **SIZES),
}
ROWS, SOURCE, TARGET = 4, 32, 16


def _xla_flops(fn, params) -> float:
    cost = jax.jit(fn).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_formula_within_ten_percent_of_xla(name):
    config = CONFIGS[name]
    model = build_model(config)
    params = strip_boxes(model.init(jax.random.key(0), *example_inputs(config)))["params"]
    source = jnp.ones((ROWS, SOURCE), jnp.int32)
    target = jnp.ones((ROWS, TARGET), jnp.int32)
    inputs = {"encoder": (source,), "decoder": (target,), "encoder_decoder": (source, target)}[config.family]

    def forward(p):
        return model.apply({"params": p}, *inputs)

    def loss(p):
        return jnp.sum(jax.nn.log_softmax(forward(p))[..., 0])

    counted = flops.step_flops(config, ROWS, source_length=0 if config.family == "decoder" else SOURCE,
                               target_length=0 if config.family == "encoder" else TARGET)
    assert counted.attention > 0 and counted.output > 0 and counted.projections > counted.attention
    assert counted.forward == pytest.approx(_xla_flops(forward, params), rel=0.10)
    assert counted.training == pytest.approx(_xla_flops(jax.grad(loss), params), rel=0.10)


def test_causal_halving_halves_only_causal_scores():
    bert, llama = CONFIGS["bert-mlm"], CONFIGS["llama-gqa"]
    assert flops.step_flops(bert, 2, 64, causal_halving=True).attention == flops.step_flops(bert, 2, 64).attention
    full, half = flops.step_flops(llama, 2, 0, 64), flops.step_flops(llama, 2, 0, 64, causal_halving=True)
    assert half.attention == pytest.approx(full.attention / 2) and half.projections == full.projections


def test_training_flops_from_a_batch_and_mfu():
    import numpy as np

    t5 = CONFIGS["t5-v1.1"]
    batch = {"inputs": np.ones((8, 48), np.int32), "targets": np.ones((8, 40), np.int32)}
    assert flops.training_flops(t5, batch) == flops.step_flops(t5, 8, 48, 40).training
    assert flops.mfu(1e9, 0.5, 4e9) == pytest.approx(0.5)
    assert flops.measure_matmul_peak(size=128, repeats=2) > 1e6  # a real, positive FLOP/s figure


@pytest.mark.parametrize("platform, kind, peak", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12), ("gpu", "NVIDIA H100 PCIe", 756e12), ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA A100-SXM4-40GB", 312e12), ("gpu", "NVIDIA L40S", 362e12), ("gpu", "NVIDIA L4", 121e12),
    ("gpu", "Some Future GPU", None), ("tpu", "TPU v5 lite", 197e12), ("tpu", "TPU v4", 275e12),
    ("cpu", "cpu", None),
])
def test_device_peak_flops_by_kind(platform, kind, peak):
    from types import SimpleNamespace

    assert flops.device_peak_flops(SimpleNamespace(platform=platform, device_kind=kind)) == peak


def test_mlm_head_on_masked_positions_counts_only_those():
    import dataclasses

    config = dataclasses.replace(CONFIGS["bert-mlm"], mlm_max_predictions=8)
    model = build_model(config)
    params = strip_boxes(model.init(jax.random.key(0), *example_inputs(config)))["params"]
    source = jnp.ones((ROWS, SOURCE), jnp.int32)
    positions = jnp.tile(jnp.arange(8) * 3, (ROWS, 1))

    def forward(p):
        return model.apply({"params": p}, source, predict_positions=positions)

    counted = flops.step_flops(config, ROWS, source_length=SOURCE, target_length=0)
    every = flops.step_flops(CONFIGS["bert-mlm"], ROWS, source_length=SOURCE, target_length=0)
    assert counted.output == pytest.approx(every.output * 8 / SOURCE)
    assert counted.forward == pytest.approx(_xla_flops(forward, params), rel=0.10)
