"""The three families: golden PartitionSpecs under FSDP+TP, and a (2,2,2) forward equal to one device."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from crosswrite_jax import sharding
from crosswrite_jax.models import presets
from crosswrite_jax.models.transformer import build_model, example_inputs
from crosswrite_jax.optim import path_str
from crosswrite_jax.state import strip_boxes

TINY = dict(vocab_size=128, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, max_length=64)
FAMILIES = {
    "bert-mlm": presets.bert(num_encoder_layers=2, head="mlm", **TINY),
    "bert-classification": presets.bert(num_encoder_layers=1, head="classification", num_labels=4, **TINY),
    "t5-v1.1": presets.t5("1.1", num_encoder_layers=1, num_decoder_layers=2, relative_buckets=8, **TINY),
    "llama-gqa": presets.llama(num_decoder_layers=2, num_kv_heads=2, **TINY),
}

# FSDP+TP: embed over fsdp; vocab, heads, kv_heads, mlp over tensor; small tables replicated.
GOLDEN = {
    "query/kernel": P("fsdp", "tensor", None), "key/kernel": P("fsdp", "tensor", None),
    "value/kernel": P("fsdp", "tensor", None), "out/kernel": P("tensor", None, "fsdp"),
    "query/bias": P("tensor", None), "key/bias": P("tensor", None), "value/bias": P("tensor", None),
    "out/bias": P("fsdp"),
    "wi/kernel": P("fsdp", "tensor"), "wi_0/kernel": P("fsdp", "tensor"), "wi_1/kernel": P("fsdp", "tensor"),
    "wo/kernel": P("tensor", "fsdp"), "wi/bias": P("tensor"), "wo/bias": P("fsdp"),
    "token_embed/embedding": P("tensor", "fsdp"), "position_embed/embedding": P(None, "fsdp"),
    "type_embed/embedding": P(None, "fsdp"), "relative_attention_bias/embedding": P(None, "tensor"),
    "output/kernel": P("fsdp", "tensor"), "pooler/kernel": P("fsdp", "tensor"), "pooler/bias": P("tensor"),
    "mlm_transform/kernel": P("fsdp", "tensor"), "mlm_transform/bias": P("tensor"), "mlm_bias": P("tensor"),
    "classifier/kernel": P("fsdp", None), "classifier/bias": P(None),
}


def _golden(path: str) -> P:
    if path.endswith(("norm/scale", "norm/bias")):
        return P(None)
    return GOLDEN[path if path == "mlm_bias" else "/".join(path.split("/")[-2:])]


def _init(config):
    model = build_model(config)
    return model, lambda key: model.init(key, *example_inputs(config))["params"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_golden_partition_specs_under_fsdp_tp(name):
    config = FAMILIES[name]
    _, init = _init(config)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules("fsdp_tp")):
        boxed = jax.eval_shape(init, jax.random.key(0))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.logical_rules("fsdp_tp"))
    specs = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    assert len(specs) >= 15
    for path, spec in specs.items():
        assert spec == _golden(path), path


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_on_a_222_mesh_equals_one_device(name):
    config = FAMILIES[name]
    model, init = _init(config)
    params = strip_boxes(init(jax.random.key(1)))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (8, 16)).astype(np.int32)
    ids[1, 10:] = 0
    inputs = (ids, ids[:, :12]) if config.family == "encoder_decoder" else (ids,)
    single = np.asarray(model.apply({"params": params}, *inputs))
    rules = sharding.logical_rules("fsdp_tp")
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        sharded_params = jax.device_put(params, shardings)
        batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in inputs]
        sharded = np.asarray(jax.jit(lambda p, *x: model.apply({"params": p}, *x))(sharded_params, *batch))
    np.testing.assert_allclose(sharded, single, atol=2e-5, rtol=1e-5)
