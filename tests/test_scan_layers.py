"""model.scan_layers: one nn.scan over stacked layers computes what the unrolled Python loop computes (loss,
gradients, a training step, cached decoding, Hugging Face import and export, LoRA and its merge)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from crosswrite_jax import peft, sharding
from crosswrite_jax.decode import beam_decode, greedy_decode
from crosswrite_jax.errors import UserError
from crosswrite_jax.models import hf, presets
from crosswrite_jax.models.transformer import (
    build_model,
    example_inputs,
    param_shapes,
    stack_layers,
    unstack_layers,
    unstacked_shapes,
)
from crosswrite_jax.optim import path_str
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.state import build_layout, strip_boxes
from crosswrite_jax.trainer import Trainer

TINY = dict(vocab_size=128, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, max_length=64)
MODELS = {
    "encoder_decoder": dataclasses.replace(tiny_config().model, num_encoder_layers=2, num_decoder_layers=3,
                                           dropout_rate=0.0),
    "t5": presets.t5("1.1", num_encoder_layers=2, num_decoder_layers=2, relative_buckets=8, **TINY),
    "llama": presets.llama(num_decoder_layers=3, num_kv_heads=2, **TINY),
    "bert-mlm": presets.bert(num_encoder_layers=2, head="mlm", **TINY),
}


def _scanned(config, **changes):
    return dataclasses.replace(config, scan_layers=True, **changes)


def _unrolled_params(config):
    model = build_model(config)
    return strip_boxes(model.init(jax.random.key(0), *example_inputs(config)))["params"]


def _ids(config, rows=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, config.vocab_size, (rows, length)), jnp.int32)


def _loss_and_grads(config, params):
    model, ids = build_model(config), _ids(config)
    args = (ids, ids) if config.family == "encoder_decoder" else (ids,)

    def loss(p):
        logits = model.apply({"params": p}, *args)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(a, b, tolerance=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tolerance, atol=tolerance, err_msg=path_str(path))


def test_parameters_are_stacked_on_a_leading_layers_axis():
    config = MODELS["t5"]
    unrolled, scanned = param_shapes(config), param_shapes(_scanned(config))
    assert scanned["decoder/layers/cross_attention/query/kernel"] == (2, 32, 4, 8)
    assert scanned["encoder/layers/mlp_norm/scale"] == (2, 32)
    assert scanned["encoder/relative_attention_bias/embedding"] == unrolled["encoder/relative_attention_bias/embedding"]
    assert not any("layer_" in path for path in scanned)
    assert unstacked_shapes(scanned) == unrolled
    params = _unrolled_params(config)
    restacked = unstack_layers(stack_layers(params))
    _assert_close(restacked, params, 0)


@pytest.mark.parametrize("name", ["encoder_decoder", "llama", "bert-mlm"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_loss_and_gradients_equal_unrolled(name, remat):
    config = dataclasses.replace(MODELS[name], remat=remat)
    params = _unrolled_params(config)
    loss, grads = _loss_and_grads(config, params)
    scanned_loss, scanned_grads = _loss_and_grads(_scanned(config), stack_layers(params))
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    _assert_close(scanned_grads, stack_layers(grads))


def _step_twice(config, params, batch, mesh):
    """Params and losses after two train steps from `params`."""
    trainer = Trainer.build(config, mesh)
    state = trainer.init_state()
    state = state.replace(params=jax.device_put(jax.device_get(params), trainer.layout.shardings.params))
    losses = []
    with trainer.context():
        step = trainer.jit_train_step()
        for _ in range(2):
            state, metrics = step(state, to_global_batch(batch, mesh))
            losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))
    return jax.device_get(state.params), losses


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_sharded_training_steps_equal_unrolled_ones(optimizer):
    # Adam's eps of 1 keeps the update smooth in the gradient, so float noise cannot flip a tiny update's sign; a
    # weight decay on a stacked norm scale (2-D once stacked) would move it by lr * decay = 5e-3. Adafactor's
    # relative step and update clipping read each parameter's scale: over all layers at once they would differ.
    # The frozen embeddings check that the per-layer optimizer keeps to the trainable leaves.
    config = tiny_config(mesh__rules="fsdp_tp", model__dropout_rate=0.0, model__num_decoder_layers=2,
                         optimizer__name=optimizer, optimizer__eps=1.0, optimizer__weight_decay=0.5,
                         optimizer__learning_rate=1e-2, optimizer__schedule="constant", optimizer__warmup_steps=0,
                         optimizer__freeze=("embed/.*",) if optimizer == "adafactor" else ())
    scanned = dataclasses.replace(config, model=_scanned(config.model))
    mesh = sharding.make_mesh((2, 2, 2))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(3, 512, (16, 16), dtype=np.int32),
             "targets": rng.integers(3, 512, (16, 16), dtype=np.int32)}
    params = _unrolled_params(config.model)
    unrolled_params, unrolled_losses = _step_twice(config, params, batch, mesh)
    scanned_params, scanned_losses = _step_twice(scanned, stack_layers(params), batch, mesh)
    np.testing.assert_allclose(scanned_losses, unrolled_losses, rtol=1e-5)
    if optimizer == "adamw":  # (Adafactor's first steps at this learning rate overshoot, unrolled as well)
        assert scanned_losses[1] < scanned_losses[0]
    _assert_close(scanned_params, stack_layers(unrolled_params))


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_golden_specs_of_a_scanned_model_lead_with_an_unsharded_layers_axis(rules):
    config = tiny_config(mesh__rules=rules, model__num_decoder_layers=2)
    mesh = sharding.make_mesh((2, 2, 2))
    unrolled = build_layout(config, mesh).shardings.params
    layout = build_layout(dataclasses.replace(config, model=_scanned(config.model)), mesh)
    specs = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.params)[0]}
    expected = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(unrolled)[0]}
    assert specs["decoder/layers/mlp/wi/kernel"] == P(None, "fsdp", None if rules == "fsdp" else "tensor")
    for path, spec in specs.items():
        if "/layers/" in path:  # the unrolled layer's spec behind a replicated layers axis
            assert spec == P(None, *expected[path.replace("/layers/", "/layer_0/")]), path
        else:
            assert spec == expected[path], path
    moments = {path_str(p).split("/mu/", 1)[1]: s.spec
               for p, s in jax.tree_util.tree_flatten_with_path(layout.shardings.opt_state)[0] if "/mu/" in path_str(p)}
    assert moments == specs


@pytest.mark.parametrize("name", ["encoder_decoder", "llama"])
def test_cached_greedy_and_beam_decoding_equal_unrolled(name):
    config = MODELS[name]
    params = _unrolled_params(config)
    inputs = _ids(config, rows=3, length=6, seed=1)
    padding = None if config.family == "encoder_decoder" else jnp.ones(inputs.shape, bool).at[0, :2].set(False)
    outputs = []
    for model_config, p in ((config, params), (_scanned(config), stack_layers(params))):
        model = build_model(model_config)
        greedy = greedy_decode(model, p, inputs, 8, eos_id=1, padding=padding)
        beam, score = beam_decode(model, p, inputs, 8, eos_id=1, beam_size=3, padding=padding)
        outputs.append((greedy, beam, score))
    (greedy, beam, score), (scanned_greedy, scanned_beam, scanned_score) = outputs
    np.testing.assert_array_equal(scanned_greedy, greedy)
    if config.family == "decoder":  # the prompt prefilled into the stacked cache two tokens at a time
        chunked = greedy_decode(model, stack_layers(params), inputs, 8, eos_id=1, padding=padding, prefill_chunk=2)
        np.testing.assert_array_equal(chunked, greedy)
    np.testing.assert_array_equal(scanned_beam, beam)
    np.testing.assert_allclose(scanned_score, score, rtol=1e-5)


def test_lora_adapters_stack_and_merge_to_the_same_outputs():
    config = _scanned(MODELS["llama"], lora_rank=4, lora_targets=".*/(query|value|wi_0)")
    model, ids = build_model(config), _ids(config)
    params = strip_boxes(model.init(jax.random.key(0), ids))["params"]
    layers = params["decoder"]["layers"]
    assert layers["self_attention"]["query"]["lora_a"].shape == (3, 32, 4)
    assert layers["mlp"]["wi_0"]["lora_b"].shape == (3, 4, 64)
    assert "lora_a" not in layers["self_attention"]["key"]
    params = jax.tree_util.tree_map_with_path(  # non-zero adapters, a different one in each layer
        lambda path, x: jax.random.normal(jax.random.key(len(path_str(path))), x.shape) * 0.1
        if path_str(path).endswith("lora_b") else x, params)
    adapted = model.apply({"params": params}, ids)
    merged = peft.merge_lora(params, config.lora_alpha)
    plain = build_model(dataclasses.replace(config, lora_rank=0))
    assert jax.tree.structure(merged) == jax.tree.structure(strip_boxes(plain.init(jax.random.key(0), ids))["params"])
    np.testing.assert_allclose(plain.apply({"params": merged}, ids), adapted, rtol=1e-4, atol=1e-4)
    # layer by layer: the merge of layer 1 is what the unrolled model's layer 1 merges to
    unrolled = peft.merge_lora(unstack_layers(params), config.lora_alpha)
    _assert_close(stack_layers(unrolled), merged)


@pytest.mark.parametrize("method, trained", [
    ("bitfit", {"decoder/layers/mlp_norm/scale", "decoder/layers/self_attention_norm/bias"}),
    ("prompt", {"prompt/embedding"}),
    ("freeze", {"decoder/layers/mlp/wi/kernel", "encoder/layers/mlp/wo/kernel"}),
])
def test_the_other_peft_methods_select_stacked_parameters(method, trained):
    config = peft.resolve(tiny_config(peft__method=method, peft__freeze="embeddings", model__scan_layers=True))
    paths = list(param_shapes(config.model))
    rule = peft.trainable_rule(config)
    peft.check_trainable(config, paths, rule)
    assert trained <= {path for path in paths if rule(path)}
    assert not rule("embed/token_embed/embedding")


def test_lora_targets_that_name_one_layer_are_refused_with_the_scanned_path_as_example():
    config = tiny_config(peft__method="lora", peft__lora_targets="decoder/layer_0/self_attention/query",
                         model__scan_layers=True)
    with pytest.raises(UserError, match="matches no layer path .*'encoder/layers/self_attention/query'"):
        build_layout(peft.resolve(config), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))


@pytest.mark.parametrize("name", ["llama-gqa", "t5-v1.1", "bert-mlm"])
def test_hf_import_into_scanned_layers_matches_transformers_and_exports_the_same_tensors(name, tmp_path):
    from test_hf import HF_MODELS, MASK, _import, _ours, _randomize, _theirs

    model = _randomize(HF_MODELS[name]())
    model.save_pretrained(tmp_path / "hf")
    kind, config, params = _import(tmp_path / "hf")
    hf_config, tensors = hf.read_checkpoint(tmp_path / "hf")
    scanned = _scanned(config)
    stacked = hf.params_from_hf(kind, scanned, tensors, param_shapes(scanned))
    assert "layers" in stacked["decoder" if kind != "bert" else "encoder"]
    _assert_close(stacked, stack_layers(params), 0)
    expected, decoder_ids = _theirs(kind, model)
    ours = _ours(scanned, stacked, decoder_ids)
    real = MASK.astype(bool) if kind == "llama" else np.ones(ours.shape[:2], bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, _ours(config, params, decoder_ids), atol=1e-4, rtol=0)  # float reordering only
    exported, reference = hf.params_to_hf(kind, scanned, stacked), hf.params_to_hf(kind, config, params)
    assert sorted(exported) == sorted(reference)
    for name_, value in reference.items():
        np.testing.assert_array_equal(exported[name_], value, err_msg=name_)


def test_init_from_a_hugging_face_directory_into_scanned_layers_and_a_layout_mismatch_says_the_fix(tmp_path):
    from test_hf import HF_MODELS, _import, _randomize

    from crosswrite_jax.config import Config, MeshConfig
    from crosswrite_jax.initialize import params_from
    from crosswrite_jax.interop import import_hf

    _randomize(HF_MODELS["llama-gqa"]()).save_pretrained(tmp_path / "hf")
    _, model_config, unrolled = _import(tmp_path / "hf")
    config = Config(task="causal_lm", model=_scanned(model_config), mesh=MeshConfig(shape=(1, 1, 1)))
    layout = build_layout(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    params = jax.device_get(params_from(str(tmp_path / "hf"), config, layout, None))
    _assert_close(params, stack_layers(unrolled), 0)
    import_hf(tmp_path / "hf", tmp_path / "run")  # a run directory with unrolled layers
    with pytest.raises(UserError, match=r"its layers are unrolled: set --config.model.scan_layers=false to match"):
        params_from(str(tmp_path / "run"), config, layout, None)


@pytest.mark.slow
def test_compile_check_of_a_scanned_model_bounds_the_step_by_the_whole_programs_flops():
    """XLA's cost analysis counts a scanned layer once, so the step-time bound rests on the unrolled program's FLOPs."""
    pytest.importorskip("libtpu", reason="compile-check needs libtpu: pip install -e '.[tpu-compile]'")
    from crosswrite_jax import compile_check as cc

    config = tiny_config(mesh__shape=(1, -1, 1), model__num_encoder_layers=4, model__num_decoder_layers=4,
                         model__scan_layers=True, model__remat="full")
    report = cc.compile_check(config, "v5e:2x2")
    assert report.fits and report.scanned_layers
    assert report.chips * report.compiled_flops_per_chip < report.model_flops_per_step  # the undercount
    # The unrolled program's count: every layer, and full remat's second forward pass (about 4/3 of the model's).
    assert 1.25 * report.model_flops_per_step < report.program_flops_per_step < 2 * report.model_flops_per_step
    peak = cc.parse_topology("v5e:2x2").chip.peak_flops
    assert report.step_time_lower_bound_s >= report.program_flops_per_step / (report.chips * peak)
    assert report.mfu_ceiling < 0.8
    assert "the scanned layer counted once" in cc.format_report(report)
