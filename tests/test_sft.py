"""Task sft: prompt -> response fine-tuning of decoder-only models. Rows hold prompt, response and EOS with loss on the
response only; packed rows give the loss of the examples taken alone; decoding reads prompts as training laid them
out; train, eval, predict (and serve's Predictor) work on a tiny run of the recipes. Offline, tiny models."""

import dataclasses
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_trees_equal
from flax import linen as nn
from test_finetune import _summaries

from crosswrite_jax import config as config_lib
from crosswrite_jax.cli import main
from crosswrite_jax.data import prompts
from crosswrite_jax.data.tokenizer import PAD_ID, Tokenizer
from crosswrite_jax.decode import greedy_decode
from crosswrite_jax.errors import UserError
from crosswrite_jax.losses import task_losses
from crosswrite_jax.models.presets import llama
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.tasks import get_task

TASK = get_task("sft")
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "red", "big", "house", "near", "river", "sun"]
TINY = {"model.vocab_size": 300, "model.d_model": 32, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.d_ff": 64, "model.num_decoder_layers": 1, "model.max_length": 64, "model.dropout_rate": 0.0,
        "data.max_source_length": 24, "data.max_target_length": 24, "data.bucket_lengths": (16, 24),
        "train.init_from": "", "train.batch_size": 8, "train.steps": 6, "train.eval_every": 3,
        "train.eval_batches": 2, "train.eval_decode_examples": 8, "train.log_every": 3, "train.progress_bar": False,
        "train.logits_chunk_length": 8, "optimizer.warmup_steps": 1, "checkpoint.every": 6,
        "checkpoint.async_save": False, "eval.batch_size": 8, "eval.max_examples": 8, "eval.max_decode_length": 8}


def _recipe(name: str, **overrides) -> config_lib.Config:
    updates = dict(TINY, **{k.replace("__", "."): v for k, v in overrides.items()})
    return config_lib.override(config_lib.load(ROOT / "configs" / name), updates)


def _pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(2, 9))), " ".join(rng.choices(WORDS, k=rng.randint(1, 6))))
            for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([" ".join(WORDS)] * 4 + ["Q: A:"], 64)


def _model(vocab_size: int = 64):
    model = build_model(llama(vocab_size=vocab_size, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
                              num_decoder_layers=2, max_length=64))
    params = nn.unbox(model.init(jax.random.key(1), np.ones((1, 8), np.int32)))["params"]
    return model, params


def test_the_prompt_template_is_checked_with_a_one_line_error_naming_the_key():
    assert "{source}" in config_lib.Config().data.prompt_template
    for bad, hint in (("no placeholder", "must hold {source}"), ("{src}: ", "does not format"),
                      ("{source} {", "does not format"), ("{{source}}", "must hold {source}")):
        with pytest.raises(UserError, match="data.prompt_template") as error:
            config_lib.override(config_lib.Config(), {"data.prompt_template": bad})
        assert hint in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="eval.sft_metric"):
        config_lib.override(config_lib.Config(), {"eval.sft_metric": "bleu4"})
    config = config_lib.override(config_lib.Config(), {"data.prompt_template": "Q: {source} {{json}} A:"})
    assert TASK.prompts(config, ["x y"]) == ["Q: x y {json} A:"]


def test_rows_hold_each_prompt_then_response_and_eos_with_only_the_prompt_masked(tokenizer):
    pairs = _pairs(40)
    data = prompts.train_dataset(pairs, tokenizer, global_batch_size=4, prompt_length=6, response_length=26, seed=0)
    batch = data[0]
    assert set(batch) == {"targets", "targets_prompt", "targets_segments", "targets_positions"}
    assert batch["targets"].shape == (4, 32)
    expected = {}
    for source, target in pairs:
        prompt = prompts.last_tokens(tokenizer.encode_batch([source])[0], 6)  # the last 5: the start token is one
        expected[tuple(prompt + tokenizer.encode_batch([target])[0] + [tokenizer.eos_id])] = len(prompt)
    found = 0
    for row in range(4):
        segments = batch["targets_segments"][row]
        assert segments.max() >= 1
        for segment in range(1, segments.max() + 1):
            at = segments == segment
            ids, prompt = tuple(batch["targets"][row][at]), batch["targets_prompt"][row][at]
            assert list(batch["targets_positions"][row][at]) == list(range(len(ids)))
            assert ids in expected, "a row holds whole examples, each prompt + response + EOS"
            assert list(prompt) == [1] * expected[ids] + [0] * (len(ids) - expected[ids])
            found += 1
        assert not batch["targets_prompt"][row][segments == 0].any()
    assert found > 4  # several examples share a row

    assert any(n < len(tokenizer.encode_batch([s])[0]) for s, _ in pairs for n in expected.values())  # cut prompts

    unpacked = prompts.train_dataset(pairs, tokenizer, global_batch_size=4, prompt_length=6, response_length=3,
                                     seed=0, packing=False)[0]
    assert set(unpacked) == {"targets", "targets_prompt"} and unpacked["targets"].shape == (4, 9)
    for ids in unpacked["targets"]:  # one example a row; a response keeps its first 2 tokens, then EOS
        ids = list(ids[ids != PAD_ID])
        assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
        assert any(tuple(ids[:-1]) == key[:len(ids) - 1] for key in expected)


def _example_rows(examples: list[tuple[list[int], list[int]]], width: int, packed: bool) -> dict[str, np.ndarray]:
    """The (prompt, response) examples in one packed row, or one row each."""
    rows = [examples] if packed else [[e] for e in examples]
    batch = {k: np.zeros((len(rows), width), np.int32) for k in ("targets", "targets_prompt", "targets_segments",
                                                                   "targets_positions")}
    for r, row in enumerate(rows):
        at = 0
        for segment, (prompt, response) in enumerate(row, start=1):
            ids = prompt + response + [1]
            span = slice(at, at + len(ids))
            batch["targets"][r, span], batch["targets_segments"][r, span] = ids, segment
            batch["targets_positions"][r, span] = np.arange(len(ids))
            batch["targets_prompt"][r, at:at + len(prompt)] = 1
            at += len(ids)
    if not packed:
        del batch["targets_segments"], batch["targets_positions"]
    return batch


def test_packed_loss_equals_the_loss_of_the_examples_taken_alone():
    model, params = _model()
    rng = np.random.default_rng(0)
    examples = [(list(rng.integers(3, 64, p)), list(rng.integers(3, 64, r))) for p, r in ((5, 3), (2, 6), (7, 1))]
    step = jax.jit(lambda batch: task_losses(model, TASK, {"params": params}, batch, True, {}, 0.0))
    loss = lambda batch: jax.device_get(step(batch))  # noqa: E731
    packed, alone = loss(_example_rows(examples, 32, packed=True)), loss(_example_rows(examples, 12, packed=False))
    assert packed["tokens"] == alone["tokens"] == 3 + 1 + 6 + 1 + 1 + 1  # each response and its EOS
    np.testing.assert_allclose(packed["loss_sum"], alone["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(packed["correct"], alone["correct"])
    # Without segment ids the later examples attend to the earlier ones and the loss changes.
    crossed = _example_rows(examples, 32, packed=True)
    del crossed["targets_segments"]
    assert abs(loss(crossed)["loss_sum"] - alone["loss_sum"]) > 1e-3


def test_prompt_tokens_carry_no_loss():
    model, params = _model()
    batch = _example_rows([([5, 6, 7, 8], [9, 10]), ([11, 12], [13, 14, 15])], 16, packed=True)
    logits, targets, weights = TASK.forward(model, {"params": params}, batch, True, {})
    np.testing.assert_array_equal(np.asarray(weights)[0], [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    logprobs = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    response = [4, 5, 6, 9, 10, 11, 12]  # the responses and their EOS
    by_hand = -sum(float(logprobs[i, targets[0, i]]) for i in response)
    sums = task_losses(model, TASK, {"params": params}, batch, True, {}, 0.0)
    np.testing.assert_allclose(float(sums["loss_sum"]), by_hand, rtol=1e-5)
    # The loss's gradient with respect to the logits is zero at every prompt position, nonzero at the response's.
    from crosswrite_jax.losses import token_losses

    grads = jax.grad(lambda x: token_losses(x, targets, weights, 0.0)["loss_sum"])(logits)
    moved = np.abs(np.asarray(grads[0])).sum(axis=-1) > 0
    np.testing.assert_array_equal(moved, np.asarray(weights)[0] > 0)


def test_greedy_decoding_reads_the_prompt_as_training_lays_it_out(tokenizer):
    model, params = _model(tokenizer.vocab_size)
    texts = ["Q: the cat sat A:", "Q: a big red house near the river A:"]
    ids, padding = prompts.prompt_batch(tokenizer, texts, 2, 16, (8, 16))
    generated = np.asarray(greedy_decode(model, params, jnp.asarray(ids), 5, tokenizer.eos_id,
                                         padding=jnp.asarray(padding)))
    for row, text in enumerate(texts):
        prompt = tokenizer.encode_batch([text])[0]
        response = [int(t) for t in generated[row] if t not in (PAD_ID, tokenizer.eos_id)]
        assert response
        batch = _example_rows([(prompt, response)], 32, packed=False)
        logits, _, _ = TASK.forward(model, {"params": params}, batch, True, {})
        # Teacher forcing on prompt + response predicts the same tokens at the response's places.
        chosen = np.argmax(np.asarray(logits[0]), axis=-1)[len(prompt):len(prompt) + len(response)]
        np.testing.assert_array_equal(chosen, response)


def test_scores_follow_eval_sft_metric():
    hypotheses, references = ["a big cat", "the dog  ran"], [["a big cat"], ["a dog ran", "the dog ran"]]
    scores = {metric: TASK.generation_scores(hypotheses, references, config_lib.override(
        config_lib.Config(), {"eval.sft_metric": metric})) for metric in ("sacrebleu", "rouge", "exact_match")}
    assert {"bleu", "chrf"} <= set(scores["sacrebleu"]) and "rouge1" not in scores["sacrebleu"]
    assert scores["rouge"]["rouge1"] == 100.0  # the best reference of each
    assert scores["exact_match"]["exact_match"] == 100.0 and scores["exact_match"]["examples"] == 2
    assert TASK.generation_scores(["x"], [["y"]], config_lib.override(
        config_lib.Config(), {"eval.sft_metric": "exact_match"}))["exact_match"] == 0.0


def test_the_task_refuses_heads_and_rows_beyond_the_positions():
    config = _recipe("finetune_sft_mt.py")
    get_task("sft").check_config(config, head_too=True)
    with pytest.raises(UserError, match="model.head=none"):
        get_task("sft").check_config(config_lib.override(config, {"model.head": "classification"}))
    learned = config_lib.override(config, {"model.position": "learned", "model.max_length": 40})
    with pytest.raises(UserError, match="beyond model.max_length=40"):
        get_task("sft").check_config(learned)
    with pytest.raises(UserError, match="set --config.eval.sft_metric=rouge"):
        get_task("sft").check_config(config_lib.override(config, {"train.best_metric": "rougeL"}))
    get_task("sft").check_config(config_lib.override(config, {"train.best_metric": "loss"}))
    with pytest.raises(UserError, match="model.family='decoder'"):
        get_task("sft").check_config(dataclasses.replace(config, model=config_lib.ModelConfig()))


def _args(overrides: dict) -> list[str]:
    return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in overrides.items()]


def test_train_eval_predict_and_serving_outputs_of_a_tiny_sft_run_through_the_cli(tmp_path, capsys):
    data, workdir = _summaries(tmp_path / "data"), tmp_path / "run"  # SciTLDR-shaped jsonl
    overrides = dict(TINY, **{"data.data_dir": str(data), "train.eval_decode_examples": 4, "eval.split": "dev"})
    recipe = str(ROOT / "configs" / "finetune_sft_scitldr.py")
    assert main(["train", "--config", recipe, "--workdir", str(workdir), *_args(overrides)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["initial_val_examples"] == 4 and 0 <= trained["val_rougeL"] <= 100  # decoded in validation
    assert trained["val_tokens"] > 0 and trained["best_step"] in (3, 6)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["task"] == "sft" and saved["data"]["prompt_template"] == "{source} TL;DR:"

    assert main(["eval", "--workdir", str(workdir)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["examples"] == 8 and {"rouge1", "rouge2", "rougeL"} <= set(scores) and "bleu" not in scores
    hypotheses = Path(scores["hypotheses_file"]).read_text().splitlines()
    assert len(hypotheses) == 8 and any(hypotheses)

    abstracts = [" ".join(json.loads(line)["source"]) for line in
                 (data / "summarization" / "scitldr" / "dev.jsonl").read_text().splitlines()]
    (tmp_path / "in.txt").write_text("".join(f"{text}\n" for text in abstracts))
    assert main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "in.txt"), "--step", "6"]) == 0
    predicted = capsys.readouterr().out.splitlines()
    assert predicted == hypotheses  # predict applies the prompt template as eval does

    from crosswrite_jax.predict import load_predictor

    predictor = load_predictor(workdir, step=6)  # what `crosswrite serve` answers with
    outputs = predictor.outputs(abstracts[:3])
    assert [o["output"] for o in outputs] == hypotheses[:3] and [o["response"] for o in outputs] == hypotheses[:3]
    beam = predictor.outputs(abstracts[:3], decode=predictor.decode_config({"beam_size": 2})[0])
    assert len(beam) == 3 and all(isinstance(o["response"], str) for o in beam)
    encode = predictor.restored.run.tokenizer.encode_batch
    assert predictor.input_lengths(["the cat"]) == [len(encode(["the cat TL;DR:"])[0]) + 1]  # the prompt's length


@pytest.mark.slow  # two tiny trainings, about 20 s on 2 cores
def test_sft_starts_from_a_causal_lm_run_with_its_parameters_and_tokenizer(tmp_path):
    from importlib import resources

    from crosswrite_jax import sharding
    from crosswrite_jax.evaluate import restore
    from crosswrite_jax.initialize import params_from
    from crosswrite_jax.train import train
    from crosswrite_jax.trainer import Trainer

    text = resources.files("crosswrite_jax.data") / "multi30k_sample" / "train.en.gz"
    lm = config_lib.override(config_lib.load(ROOT / "configs" / "pretrain_causal_lm.py"), {
        **{k: v for k, v in TINY.items() if k.startswith(("model.", "optimizer.", "checkpoint."))},
        "data.sources": (f"text:{text}",), "data.eval_sources": (), "data.mixture_weights": (),
        "data.max_source_length": 32, "data.max_target_length": 32, "train.steps": 2, "train.batch_size": 8,
        "train.eval_every": 0, "train.eval_at_start": False, "train.progress_bar": False, "checkpoint.every": 2})
    train(lm, tmp_path / "lm")
    config = _recipe("finetune_sft_mt.py", data__dataset="multi30k_sample", train__init_from=str(tmp_path / "lm"),
                     train__steps=2, train__eval_every=0, train__eval_at_start=False, train__best_metric="",
                     train__early_stopping_patience=0)
    trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
    lm_tokenizer = Tokenizer.load(tmp_path / "lm" / "tokenizer")
    loaded = jax.device_get(params_from(str(tmp_path / "lm"), config, trainer.layout, lm_tokenizer))
    assert_trees_equal(loaded, jax.device_get(restore(tmp_path / "lm").params))  # every parameter, none fresh
    assert np.isfinite(train(config, tmp_path / "sft")["loss"])
    assert Tokenizer.load(tmp_path / "sft" / "tokenizer").fingerprint == lm_tokenizer.fingerprint


@pytest.mark.parametrize("packing", [True, False])
def test_compile_check_sees_the_rows_the_pipeline_makes(packing, tokenizer):
    from crosswrite_jax import compile_check, sharding
    from crosswrite_jax.batches import make_dataset
    from crosswrite_jax.flops import step_flops

    config = _recipe("finetune_sft_mt.py", data__packing=packing)
    made = make_dataset(_pairs(64), tokenizer, config, seed=0)[0]
    abstract = compile_check.abstract_batch(config, sharding.make_mesh((-1, 1, 1)))
    assert {k: v.shape for k, v in abstract.items()} == {k: v.shape for k, v in made.items()}
    row = made["targets"].shape[1]
    assert row == 48 and compile_check.model_flops_per_step(config) == step_flops(config.model, 8, 0, row).training
