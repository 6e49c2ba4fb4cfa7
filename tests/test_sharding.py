"""Mesh construction and the golden PartitionSpec of every parameter under two presets, from state.build_layout."""

import dataclasses

import jax
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from crosswrite_jax import sharding
from crosswrite_jax.errors import UserError
from crosswrite_jax.optim import path_str, tree_bytes
from crosswrite_jax.state import build_layout

# Every parameter of the 1+1-layer tiny model, by the last two path parts (kind of leaf).
ATTENTION = ("self_attention", "cross_attention")
GOLDEN = {
    "fsdp": {
        "query/kernel": P("fsdp", None, None), "key/kernel": P("fsdp", None, None),
        "value/kernel": P("fsdp", None, None), "out/kernel": P(None, None, "fsdp"),
        "wi/kernel": P("fsdp", None), "wo/kernel": P(None, "fsdp"),
        "norm/scale": P(None), "norm/bias": P(None), "token_embed/embedding": P(None, "fsdp"),
    },
    "tensor_parallel": {
        "query/kernel": P(None, "tensor", None), "key/kernel": P(None, "tensor", None),
        "value/kernel": P(None, "tensor", None), "out/kernel": P("tensor", None, None),
        "wi/kernel": P(None, "tensor"), "wo/kernel": P("tensor", None),
        "norm/scale": P(None), "norm/bias": P(None), "token_embed/embedding": P("tensor", None),
    },
}
EXPECTED_PATHS = sorted(
    [f"{stack}/layer_0/{block}/{proj}/kernel" for stack in ("encoder", "decoder") for block in ATTENTION
     for proj in ("query", "key", "value", "out") if not (stack == "encoder" and block == "cross_attention")]
    + [f"{stack}/layer_0/mlp/{w}/kernel" for stack in ("encoder", "decoder") for w in ("wi", "wo")]
    + [f"{stack}/{norm}/{p}" for stack in ("encoder", "decoder") for p in ("scale", "bias")
       for norm in ("layer_0/self_attention_norm", "layer_0/mlp_norm", "final_norm")]
    + [f"decoder/layer_0/cross_attention_norm/{p}" for p in ("scale", "bias")]
    + ["embed/token_embed/embedding"])


def _golden(preset: str, path: str) -> P:
    table = GOLDEN[preset]
    if path.endswith(("/scale", "/bias")):
        return table["norm/" + path.rsplit("/", 1)[1]]
    return table["/".join(path.split("/")[-2:])]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_partition_spec_of_every_parameter(preset, scan):
    """With model.scan_layers, a layer's parameters lead with the stacked 'layers' axis, never sharded."""
    layout = build_layout(tiny_config(mesh__rules=preset, model__scan_layers=scan), sharding.make_mesh((2, 2, 2)))
    flat = jax.tree_util.tree_flatten_with_path(layout.shardings.params)[0]
    specs = {path_str(p): s.spec for p, s in flat}
    assert sorted(specs) == sorted(p.replace("/layer_0/", "/layers/" if scan else "/layer_0/") for p in EXPECTED_PATHS)
    for path, spec in specs.items():
        stacked = "/layers/" in path
        assert spec == (P(None, *_golden(preset, path)) if stacked else _golden(preset, path)), path


def test_optimizer_moments_follow_their_parameters():
    layout = build_layout(tiny_config(mesh__rules="fsdp"), sharding.make_mesh((2, 2, 2)))
    specs = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0]}
    mu = [spec for path, spec in specs.items() if path.endswith("/mu/embed/token_embed/embedding")]
    assert mu == [P(None, "fsdp")]
    counts = [spec for path, spec in specs.items() if path.endswith("count")]
    assert counts and all(spec == P() for spec in counts)


def test_frozen_parameters_hold_no_moments_and_the_others_keep_their_shardings():
    config = tiny_config(mesh__rules="fsdp", optimizer__freeze=("embed/.*",))
    layout = build_layout(config, sharding.make_mesh((2, 2, 2)))
    params = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.params)[0]}
    moments = {path_str(p).split("/mu/", 1)[1]: s.spec
               for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0] if "/mu/" in path_str(p)}
    assert moments == {path: spec for path, spec in params.items() if not path.startswith("embed/")}
    assert jax.tree.structure(layout.shardings.opt_state) == jax.tree.structure(layout.abstract.opt_state)


def test_adafactor_statistics_follow_their_parameters_where_unfactored_and_are_replicated_where_factored():
    # d_model 256, d_ff 512: the matrices are factored (both sides >= 128), the vectors are not.
    config = tiny_config(mesh__rules="fsdp_tp", optimizer__name="adafactor", model__d_model=256, model__d_ff=512,
                         optimizer__freeze=("embed/.*",))
    layout = build_layout(config, sharding.make_mesh((2, 2, 2)))
    params = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.params)[0]}
    shapes = {path_str(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(layout.abstract.params)[0]}
    state = jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0]
    abstract = {path_str(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(layout.abstract.opt_state)[0]}
    kernel = "decoder/layer_0/mlp/wi/kernel"
    for path, s in state:
        path = path_str(path)
        field, _, param = path.partition("/v_row/") if "/v_row/" in path else path.partition("/v_col/") \
            if "/v_col/" in path else path.partition("/v/")
        if not param:
            assert s.spec == P(), path  # step counts
            continue
        assert not param.startswith("embed/")  # frozen: no statistics
        same_shape = abstract[path] == shapes[param]
        assert s.spec == (params[param] if same_shape else P()), path
    assert params[kernel] == P("fsdp", "tensor") and shapes[kernel] == (256, 512)
    factored = {path_str(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(layout.abstract.opt_state)[0]
                if path_str(p).endswith(kernel)}
    assert sorted(factored.values()) == [(1,), (256,), (512,)]  # v_row, v_col, and a placeholder v
    adam = build_layout(dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, name="adamw")),
                        sharding.make_mesh((2, 2, 2)))
    # At most one statistic per weight against Adam's two; per-head attention kernels [256, 4, 64] stay unfactored
    # (their second-largest side is under optax's min_dim_size_to_factor, 128).
    assert tree_bytes(layout.abstract.opt_state) < tree_bytes(adam.abstract.opt_state) / 2


def test_created_state_lives_in_its_shards():
    config = tiny_config(mesh__rules="fsdp_tp")
    state = build_layout(config, sharding.make_mesh((2, 2, 2))).create_state(config.train.seed)
    kernel = state.params["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]  # [embed=32, mlp=64]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 32)}


def test_mesh_shape_fills_minus_one_and_rejects_mismatch():
    assert sharding.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
    assert sharding.make_mesh((-1, 1, 1)).shape == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(UserError, match="mesh.shape.*needs 12 devices but 8"):
        sharding.resolve_mesh_shape((3, 2, 2), 8)
    with pytest.raises(UserError, match="do not divide"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)


def test_unknown_rules_preset_names_the_key():
    with pytest.raises(UserError, match="mesh.rules"):
        sharding.logical_rules("zero3")
