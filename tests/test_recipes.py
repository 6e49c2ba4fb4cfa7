"""Every fine-tuning recipe is sound by default: it scores the starting model, keeps its best validation
checkpoint and stops when validation stalls."""

import dataclasses

import pytest
from conftest import ROOT

from crosswrite_jax import config as config_lib

FINETUNING = sorted(p for p in (ROOT / "configs").glob("finetune_*.py") if p.name != "finetune_common.py")


def test_the_fine_tuning_recipes_are_found():
    assert len(FINETUNING) >= 6


@pytest.mark.parametrize("path", FINETUNING, ids=lambda p: p.stem)
def test_fine_tuning_recipes_validate_at_start_keep_the_best_and_stop_early(path, monkeypatch):
    monkeypatch.setenv("CROSSWRITE_DATA", str(ROOT / "missing-data-is-fine-here"))
    train = config_lib.load(path).train
    assert train.eval_at_start, "the metric before fine-tuning belongs in the results"
    assert train.best_metric and train.early_stopping_patience > 0
    assert 0 < train.eval_every < train.steps


def test_few_pair_translation_splits_multi30k_into_disjoint_labeled_english_and_german_parts(tmp_path, monkeypatch):
    from crosswrite_jax.data.text_sources import read_documents
    from crosswrite_jax.workdir import Run

    folder = tmp_path / "multi30k"
    folder.mkdir()
    for lang in ("en", "de"):
        (folder / f"train.{lang}").write_text("".join(f"{lang} {i}\n" for i in range(29000)))
    monkeypatch.setenv("CROSSWRITE_DATA", str(tmp_path))
    pretrain = config_lib.load(ROOT / "configs" / "pretrain_mt_monolingual.py")
    finetune = config_lib.load(ROOT / "configs" / "finetune_mt.py")
    assert finetune.train.init_from == "runs/pretrain_mt_monolingual"
    assert dataclasses.replace(finetune.model, dropout_rate=pretrain.model.dropout_rate) == pretrain.model
    labeled = Run(tmp_path / "run", finetune, None).read_split("train", finetune.data.max_train_examples)
    english, german = (read_documents(spec) for spec in pretrain.data.sources)
    assert all(s.split()[1] == t.split()[1] for s, t in labeled)  # still aligned pairs
    ids = [{int(text.split()[1]) for text in part} for part in ([s for s, _ in labeled], english, german)]
    assert [len(part) for part in ids] == [2900, 13050, 13050]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert {text.split()[0] for text in english} == {"en"} and {text.split()[0] for text in german} == {"de"}


@pytest.mark.parametrize("path", [p for p in FINETUNING if "mlm" in p.stem or "t5" in p.stem], ids=lambda p: p.stem)
def test_fresh_parameter_patterns_of_the_recipes_match_their_models(path, monkeypatch):
    import re

    import jax
    import numpy as np
    from flax import traverse_util

    from crosswrite_jax.models.transformer import build_model

    monkeypatch.setenv("CROSSWRITE_DATA", str(ROOT / "missing-data-is-fine-here"))
    config = config_lib.load(path)
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.ones((1, 8), np.int32))
    names = list(traverse_util.flatten_dict(dict(shapes["params"]), sep="/"))
    for pattern in config.train.init_exclude:
        assert any(re.fullmatch(pattern, name) for name in names), (pattern, names[:5])
