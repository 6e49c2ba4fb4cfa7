"""compile-check for every task: the batch it compiles the train step for has the keys, dtypes and shapes of the
batches the task's training pipeline makes (the widest bucket when rows are not packed), and the step lowers on it.
Classification and tagging also compile for a TPU slice (libtpu, slow)."""

import gzip

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from test_finetune import _entities, _sentiment, _summaries

from crosswrite_jax import compile_check as cc
from crosswrite_jax import config as config_lib
from crosswrite_jax.bench import trainer_and_batches
from crosswrite_jax.data.tokenizer import Tokenizer, save_new
from crosswrite_jax.flops import batch_lengths, step_flops
from crosswrite_jax.tasks import TASKS

BUNDLED_TEXT = ROOT / "crosswrite_jax" / "data" / "multi30k_sample" / "train.en.gz"
TINY_MODEL = {"model.vocab_size": 512, "model.d_model": 32, "model.num_heads": 4, "model.d_ff": 64,
              "model.num_encoder_layers": 1, "model.num_decoder_layers": 1, "model.max_length": 64,
              "train.batch_size": 16, "train.init_from": "", "train.eval_every": 0, "train.eval_at_start": False,
              "train.progress_bar": False, "peft.method": "full"}
BATCHES = 6  # enough for every unpacked case below to reach its widest bucket

# (recipe, data maker (None: the bundled sample), overrides). Unpacked rows are cut below the longest bucket, so
# their widest batches pad to a bucket longer than data.max_source_length (widest_bucket).
CASES = {
    "translation": ("quickstart.py", None, {"data.packing": False, "data.max_source_length": 12,
                                            "data.max_target_length": 12, "data.bucket_lengths": (8, 16)}),
    "translation_packed": ("quickstart.py", None, {"data.packing": True, "data.max_source_length": 24,
                                                   "data.max_target_length": 20}),
    "summarization": ("finetune_scitldr.py", _summaries, {"data.max_source_length": 6, "data.max_target_length": 3,
                                                          "data.bucket_lengths": (4, 8)}),
    "summarization_packed": ("finetune_scitldr.py", _summaries, {"data.packing": True, "data.max_source_length": 24,
                                                                 "data.max_target_length": 12, "train.batch_size": 8}),
    "classification": ("finetune_sst2.py", _sentiment, {"data.max_source_length": 5, "data.bucket_lengths": (4, 8)}),
    "classification_packed": ("finetune_sst2.py", _sentiment, {"data.packing": True, "data.max_source_length": 24,
                                                               "data.max_segments_per_row": 3}),
    "tagging": ("finetune_ner_wnut17.py", _entities, {"data.max_source_length": 5, "data.bucket_lengths": (4, 8),
                                                      "model.num_labels": 5}),
    "tagging_packed": ("finetune_ner_wnut17.py", _entities, {"data.packing": True, "data.max_source_length": 24,
                                                             "model.num_labels": 5}),
    "sft": ("finetune_sft_mt.py", None, {"data.dataset": "multi30k_sample", "data.max_source_length": 16,
                                         "data.max_target_length": 16}),
    "sft_unpacked": ("finetune_sft_mt.py", None, {"data.dataset": "multi30k_sample", "data.packing": False,
                                                  "data.max_source_length": 16, "data.max_target_length": 16}),
    "mlm": ("pretrain_mlm.py", "text", {"data.max_source_length": 32, "data.max_target_length": 32}),
    "span_corruption": ("pretrain_span_corruption.py", "text", {"data.max_source_length": 32,
                                                                "data.max_target_length": 16}),
    "denoising": ("pretrain_mt_monolingual.py", "text", {"data.max_source_length": 32,
                                                         "data.max_target_length": 32}),
    "causal_lm": ("pretrain_causal_lm.py", "text", {"data.max_source_length": 32, "data.max_target_length": 32}),
    "causal_lm_unpacked": ("pretrain_causal_lm.py", "text", {"data.packing": False, "data.max_source_length": 32,
                                                             "data.max_target_length": 32}),
    "prefix_lm": ("pretrain_causal_lm.py", "text", {"task": "prefix_lm", "data.max_source_length": 32,
                                                    "data.max_target_length": 32}),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BPE vocabulary of the bundled English text with a mask token and sentinels: every task can use it."""
    with gzip.open(BUNDLED_TEXT, "rt", encoding="utf-8") as f:
        texts = f.read().splitlines()
    folder = tmp_path_factory.mktemp("tokenizer")
    save_new(Tokenizer.train(texts, 400, "bpe", mask=True, sentinels=100), folder, force=True)
    return str(folder)


def _config(case: str, tmp_path, tokenizer_dir: str) -> config_lib.Config:
    recipe, make_data, overrides = CASES[case]
    updates = {**TINY_MODEL, "data.tokenizer": tokenizer_dir, **overrides}
    if make_data == "text":
        updates.update({"data.sources": (f"text:{BUNDLED_TEXT}",), "data.eval_sources": (),
                        "data.mixture_weights": (), "data.tokenizer_sources": ()})
    elif make_data is not None:
        updates["data.data_dir"] = str(make_data(tmp_path / "data"))
    if recipe == "quickstart.py":
        return tiny_config(**{k.replace(".", "__"): v for k, v in updates.items()})
    return config_lib.override(config_lib.load(ROOT / "configs" / recipe), updates)


def test_the_cases_cover_every_task():
    tasks = {overrides.get("task") or config_lib.load(ROOT / "configs" / recipe).task
             for recipe, _, overrides in CASES.values()}
    assert tasks == set(TASKS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_check_builds_the_batches_the_pipeline_makes_and_the_step_lowers(case, tmp_path, tokenizer_dir):
    trainer, batches, _ = trainer_and_batches(_config(case, tmp_path, tokenizer_dir), BATCHES)
    config = trainer.config
    abstract = cc.abstract_batch(config, trainer.mesh)
    for batch in batches:  # one process: its rows are the global batch
        assert {k: v.dtype for k, v in batch.items()} == {k: v.dtype for k, v in abstract.items()}
        assert all(v.ndim == abstract[k].ndim and np.all(np.less_equal(v.shape, abstract[k].shape))
                   for k, v in batch.items()), {k: v.shape for k, v in batch.items()}
    widest = {k: tuple(int(n) for n in np.max([b[k].shape for b in batches], axis=0)) for k in abstract}
    assert widest == {k: v.shape for k, v in abstract.items()}  # the pipeline reaches the shapes compiled for
    if config.data.packing or trainer.task.pretraining or trainer.task.prompted:
        assert all({k: v.shape for k, v in b.items()} == widest for b in batches)  # one compiled shape
    rows, source, target = batch_lengths(config.model.family, {k: np.empty(s) for k, s in widest.items()})
    assert cc.model_flops_per_step(config) == step_flops(config.model, rows, source, target).training > 0
    with trainer.context():
        lowered = trainer.jit_train_step().lower(trainer.layout.abstract_with_shardings(), abstract)
    assert "stablehlo" in lowered.as_text()[:20000]


def _need_libtpu():
    pytest.importorskip("libtpu", reason="compile-check needs libtpu: pip install -e '.[tpu-compile]'")


@pytest.mark.slow  # two TPU compiles of tiny labeled models (libtpu), about 20 s each on 2 cores
@pytest.mark.parametrize("case", ["classification_packed", "tagging"])
def test_compile_check_compiles_labeled_tasks_for_a_tpu_slice(case, tmp_path, tokenizer_dir):
    _need_libtpu()
    config = config_lib.override(_config(case, tmp_path, tokenizer_dir), {"mesh.shape": (1, -1, 1)})
    report = cc.compile_check(config, "v5e:2x2")
    assert report.fits and report.chips == 4 and report.compile_seconds > 0 and report.model_flops_per_step > 0
    rows, source, _ = batch_lengths("encoder", cc.abstract_batch(config))
    assert report.model_flops_per_step == step_flops(config.model, rows, source, 0).training
    assert 0 < report.mfu_ceiling <= 1 and "headroom" in cc.format_report(report)


def test_the_step_flops_count_every_layer_microbatch_and_chunk():
    """XLA's count of the step without loops: at least the model's matmul FLOPs, the same scanned or not, with
    microbatches or chunked logits; full remat adds a second forward pass."""
    config = tiny_config(task="span_corruption", model__num_encoder_layers=4, model__num_decoder_layers=4,
                         model__scan_layers=True, data__max_target_length=16, train__grad_accum_steps=2,
                         train__logits_chunk_length=8)
    model, flops = cc.model_flops_per_step(config), cc.program_flops_per_step(config)
    assert model < flops < 1.25 * model
    plain = config_lib.override(config, {"model.scan_layers": False, "train.grad_accum_steps": 1,
                                         "train.logits_chunk_length": 0})
    assert cc.program_flops_per_step(plain) == flops
    remat = cc.program_flops_per_step(config_lib.override(config, {"model.remat": "full"}))
    assert 1.25 * model < remat < 1.6 * model
