"""Every fine-tuning recipe is sound by default: it scores the starting model, keeps its best validation
checkpoint and stops when validation stalls."""

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
