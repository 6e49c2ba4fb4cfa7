"""The three families: golden PartitionSpecs under FSDP+TP (from state.build_layout, the layout training,
evaluation and export use), and a (2,2,2) forward equal to one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from crosswrite_jax import sharding
from crosswrite_jax.config import Config, MeshConfig
from crosswrite_jax.models import presets
from crosswrite_jax.optim import path_str
from crosswrite_jax.state import build_layout, strip_boxes

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


def _layout(name):
    config = Config(model=FAMILIES[name], mesh=MeshConfig(shape=(2, 2, 2), rules="fsdp_tp"))
    return build_layout(config, sharding.make_mesh(config.mesh.shape))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_golden_partition_specs_under_fsdp_tp(name):
    layout = _layout(name)
    specs = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.params)[0]}
    assert len(specs) >= 15
    for path, spec in specs.items():
        assert spec == _golden(path), path
    moments = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0]
               if "/mu/" in path_str(p)}
    assert len(moments) == len(specs)
    for path, spec in moments.items():
        assert spec == _golden(path.split("/mu/", 1)[1]), path


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_on_a_222_mesh_equals_one_device(name):
    config = FAMILIES[name]
    layout = _layout(name)
    model = layout.model
    params = strip_boxes(layout.init_params(jax.random.key(1)))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (8, 16)).astype(np.int32)
    ids[1, 10:] = 0
    inputs = (ids, ids[:, :12]) if config.family == "encoder_decoder" else (ids,)
    single = np.asarray(model.apply({"params": params}, *inputs))
    mesh = layout.mesh
    with layout.context():
        sharded_params = jax.device_put(params, layout.shardings.params)
        batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in inputs]
        sharded = np.asarray(jax.jit(lambda p, *x: model.apply({"params": p}, *x))(sharded_params, *batch))
    np.testing.assert_allclose(sharded, single, atol=2e-5, rtol=1e-5)
