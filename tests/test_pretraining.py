"""Pretraining: objective batches, packing without cross-example attention, mixtures, resumable iterators."""

import dataclasses
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_trees_equal

from crosswrite_jax import checkpoint
from crosswrite_jax import config as config_lib
from crosswrite_jax.data import pretraining
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.objectives import reconstruct_spans
from crosswrite_jax.train import train

WORDS = ("river stone cloud garden lantern harbor meadow violin candle window thunder orchard pebble "
         "mirror falcon bridge ember willow compass saddle").split()


def _sentences(rng: np.random.Generator, count: int, words=WORDS) -> list[str]:
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """books/*.txt and news.txt (one document per line) and valid.txt, all in one data_dir."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "books").mkdir()
    for name in ("a", "b"):
        (root / "books" / f"{name}.txt").write_text("\n".join(_sentences(rng, 150)) + "\n")
    (root / "news.txt").write_text("\n".join(_sentences(rng, 100)) + "\n")
    (root / "valid.txt").write_text("\n".join(_sentences(rng, 40)) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    texts = [line for path in sorted(corpus.rglob("*.txt")) for line in path.read_text().splitlines()]
    return Tokenizer.train(texts, 300, "bpe", mask=True, sentinels=20)


OBJECTIVE = config_lib.ObjectiveConfig()


def _documents(corpus: Path) -> list[list[str]]:
    books = [line for p in sorted((corpus / "books").glob("*.txt")) for line in p.read_text().splitlines()]
    return [books, (corpus / "news.txt").read_text().splitlines()]


def _dataset(corpus, tokenizer, task, **kwargs):
    args = dict(task=task, objective=OBJECTIVE, vocab_size=512, global_batch_size=8, inputs_length=64,
                targets_length=16 if task == "span_corruption" else 64, seed=3)
    args.update(kwargs)
    return pretraining.pretraining_dataset(_documents(corpus), tokenizer, **args)


def _segments_of(row: np.ndarray, segments: np.ndarray) -> list[np.ndarray]:
    return [row[segments == s] for s in range(1, int(segments.max()) + 1)]


def test_span_corruption_rows_hold_whole_examples_that_reconstruct_the_text(corpus, tokenizer):
    batch = next(iter(_dataset(corpus, tokenizer, "span_corruption")))
    assert batch["inputs"].shape == (8, 64) and batch["targets"].shape == (8, 16)
    documents = [tokenizer.encode_batch([d])[0] for docs in _documents(corpus) for d in docs]
    text = {tuple(ids) for ids in documents}
    chunk = pretraining.chunk_length("span_corruption", 64, 16, 0.15, 3.0)
    pieces = {tuple(ids[i:i + chunk]) for ids in text for i in range(0, len(ids), chunk)}
    checked = 0
    for r in range(8):
        inputs = _segments_of(batch["inputs"][r], batch["inputs_segments"][r])
        targets = _segments_of(batch["targets"][r], batch["targets_segments"][r])
        assert len(inputs) == len(targets) >= 1
        for x, y in zip(inputs, targets):
            original = reconstruct_spans(x, y, sentinel_ids=tokenizer.sentinel_ids, eos_id=tokenizer.eos_id)
            assert tuple(original) in pieces
            checked += 1
        positions = batch["inputs_positions"][r][batch["inputs_segments"][r] > 0]
        assert positions[0] == 0 and np.all((np.diff(positions) == 1) | (positions[1:] == 0))
    assert checked > 8  # several examples share rows


def test_denoising_hides_each_span_behind_one_mask_and_targets_the_whole_text(corpus, tokenizer):
    objective = config_lib.ObjectiveConfig(noise_density=0.35)
    batch = next(iter(_dataset(corpus, tokenizer, "denoising", objective=objective)))
    assert batch["inputs"].shape == batch["targets"].shape == (8, 64)
    documents = [tokenizer.encode_batch([d])[0] for docs in _documents(corpus) for d in docs]
    chunk = pretraining.chunk_length("denoising", 64, 64, 0.35, 3.0)
    pieces = {tuple(ids[i:i + chunk]) for ids in documents for i in range(0, len(ids), chunk)}
    hidden = shown = 0
    for r in range(8):
        inputs = _segments_of(batch["inputs"][r], batch["inputs_segments"][r])
        targets = _segments_of(batch["targets"][r], batch["targets_segments"][r])
        assert len(inputs) == len(targets) >= 1
        for x, y in zip(inputs, targets):
            assert y[-1] == tokenizer.eos_id and tuple(y[:-1]) in pieces  # the whole original text
            kept = x[x != tokenizer.mask_id]
            masks = int((x == tokenizer.mask_id).sum())
            assert masks >= 1 and not np.any(np.diff(np.flatnonzero(x == tokenizer.mask_id)) == 1)
            assert len(kept) < len(y) and _is_subsequence(kept, y)
            hidden, shown = hidden + len(y) - len(kept), shown + len(y)
    assert 0.25 < hidden / shown < 0.45  # about noise_density of the tokens


def _is_subsequence(short: np.ndarray, long: np.ndarray) -> bool:
    position = iter(long.tolist())
    return all(token in position for token in short.tolist())


def test_mlm_batches_predict_only_corrupted_positions(corpus, tokenizer):
    batches = list(itertools.islice(iter(_dataset(corpus, tokenizer, "mlm")), 6))
    selected = total = masked = 0
    for b in batches:
        real = b["inputs_segments"] > 0
        chosen = b["targets"] != 0
        assert not np.any(chosen & ~real)
        assert not np.any(np.isin(b["targets"][chosen], [tokenizer.pad_id, tokenizer.eos_id, tokenizer.mask_id]))
        selected += chosen.sum()
        total += real.sum()
        masked += (b["inputs"][chosen] == tokenizer.mask_id).sum()
    assert 0.10 < selected / total < 0.20
    assert 0.65 < masked / selected < 0.95


def test_prefix_lm_marks_a_prefix_inside_every_example(corpus, tokenizer):
    batch = next(iter(_dataset(corpus, tokenizer, "prefix_lm")))
    assert set(batch) >= {"targets", "targets_segments", "targets_positions", "targets_prefix"}
    for r in range(8):
        for s in range(1, int(batch["targets_segments"][r].max()) + 1):
            prefix = batch["targets_prefix"][r][batch["targets_segments"][r] == s]
            n = int(prefix.sum())
            assert 1 <= n < len(prefix) and np.all(prefix[:n] == 1)  # a leading run, with a suffix to predict


def test_packing_leaves_less_padding_than_one_example_per_row(corpus, tokenizer):
    for task in ("causal_lm", "span_corruption"):
        packed = list(itertools.islice(iter(_dataset(corpus, tokenizer, task)), 8))
        alone = list(itertools.islice(iter(_dataset(corpus, tokenizer, task, packing=False)), 8))
        assert pretraining.padding_fraction(packed) < 0.5 * pretraining.padding_fraction(alone)
        assert all(b["targets_segments"].max() == 1 for b in alone)


def test_mixture_follows_the_weights(tmp_path, tokenizer):
    rng = np.random.default_rng(1)
    sources = [_sentences(rng, 200, ["river"]), _sentences(rng, 200, ["stone"])]
    ds = pretraining.pretraining_dataset(sources, tokenizer, task="causal_lm", objective=OBJECTIVE, vocab_size=512,
                                         global_batch_size=8, inputs_length=64, targets_length=64, seed=0,
                                         weights=(3.0, 1.0))
    river, stone = (set(tokenizer.encode_batch([w])[0]) for w in ("river", "stone"))
    counts = np.zeros(2)
    for b in itertools.islice(iter(ds), 40):
        ids = b["targets"][b["targets_segments"] > 0]
        counts += [np.isin(ids, list(river)).sum(), np.isin(ids, list(stone)).sum()]
    assert 0.68 < counts[0] / counts.sum() < 0.82


def test_processes_read_disjoint_shards(corpus, tokenizer):
    docs = _documents(corpus)[1]
    shards = [pretraining.tokenized_source(docs, tokenizer, seed=0, shuffle=False, process_index=i, process_count=2)
              for i in range(2)]
    rows = [{tuple(x) for x in shard} for shard in shards]
    assert not rows[0] & rows[1]
    assert len(rows[0]) + len(rows[1]) == len({tuple(x) for x in tokenizer.encode_batch(docs)})


def test_iterator_state_restores_the_exact_batch_sequence(corpus, tokenizer):
    ds = _dataset(corpus, tokenizer, "span_corruption")
    uninterrupted = list(itertools.islice(iter(ds), 12))
    first = iter(ds)
    for _ in range(5):
        next(first)
    state = first.get_state()
    resumed = iter(ds)
    resumed.set_state(state)
    for expected in uninterrupted[5:]:
        got = next(resumed)
        assert got.keys() == expected.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_eval_pass_is_finite_and_covers_every_document(corpus, tokenizer):
    docs = [(corpus / "valid.txt").read_text().splitlines()]
    ds = pretraining.pretraining_dataset(docs, tokenizer, task="causal_lm", objective=OBJECTIVE, vocab_size=512,
                                         global_batch_size=8, inputs_length=64, targets_length=64, seed=0,
                                         shuffle=False)
    batches = list(ds)
    tokens = sum(int((b["targets_segments"] > 0).sum()) for b in batches)
    assert tokens == sum(len(ids) + 1 for ids in tokenizer.encode_batch(docs[0]))  # every token and its EOS


def test_objective_needs_its_special_tokens(corpus):
    plain = Tokenizer.train(_documents(corpus)[1], 300, "bpe")
    for task, word in (("mlm", "mask token"), ("span_corruption", "sentinel"), ("denoising", "mask token")):
        with pytest.raises(UserError, match=word):
            _dataset(corpus, plain, task)


# --- attention stays inside packed examples --------------------------------------------------------------

def _tiny_model(family: str, **extra):
    config = config_lib.ModelConfig(family=family, vocab_size=64, d_model=32, num_heads=4, d_ff=64,
                                    num_encoder_layers=1 if family != "decoder" else 0,
                                    num_decoder_layers=1 if family != "encoder" else 0, max_length=32,
                                    dropout_rate=0.0, position="rope" if family == "decoder" else "learned", **extra)
    return build_model(config)


def test_packed_examples_do_not_see_each_other():
    a, b = np.arange(5, 12, dtype=np.int32), np.arange(20, 25, dtype=np.int32)
    row = np.zeros((1, 16), np.int32)
    row[0, :7], row[0, 7:12] = a, b
    segments = np.zeros((1, 16), np.int32)
    segments[0, :7], segments[0, 7:12] = 1, 2
    positions = np.zeros((1, 16), np.int32)
    positions[0, :7], positions[0, 7:12] = np.arange(7), np.arange(5)
    for family, extra in (("decoder", {}), ("encoder", {"head": "mlm"})):
        model = _tiny_model(family, **extra)
        params = model.init(jax.random.key(0), jnp.asarray(row))
        packed = model.apply(params, row, inputs_segments=segments, inputs_positions=positions)
        alone = model.apply(params, b[None], inputs_segments=np.ones((1, 5), np.int32),
                            inputs_positions=np.arange(5)[None])
        np.testing.assert_allclose(packed[0, 7:12], alone[0], atol=1e-5, err_msg=family)


def test_prefix_attention_is_bidirectional_inside_the_prefix_only():
    model = _tiny_model("decoder")
    ids = np.arange(3, 13, dtype=np.int32)[None]
    prefix = (np.arange(10) < 4).astype(np.int32)[None]
    params = model.init(jax.random.key(1), jnp.asarray(ids))
    base = model.apply(params, ids, inputs_prefix=prefix)
    in_prefix = ids.copy()
    in_prefix[0, 3] = 40  # the last prefix token: earlier prefix positions see it
    changed = model.apply(params, in_prefix, inputs_prefix=prefix)
    assert not np.allclose(base[0, 0], changed[0, 0])
    in_suffix = ids.copy()
    in_suffix[0, 7] = 40  # a suffix token: nothing before it may change
    changed = model.apply(params, in_suffix, inputs_prefix=prefix)
    np.testing.assert_allclose(base[0, :7], changed[0, :7], atol=1e-6)
    # Without a prefix the model is causal again: position 0 ignores token 3.
    np.testing.assert_allclose(model.apply(params, in_prefix)[0, 0], model.apply(params, ids)[0, 0], atol=1e-6)


# --- whole runs -------------------------------------------------------------------------------------------

TINY = {"model.vocab_size": 512, "model.d_model": 32, "model.num_heads": 4, "model.num_kv_heads": 0,
        "model.d_ff": 64, "model.max_length": 64, "data.max_source_length": 64, "data.max_target_length": 16,
        "train.batch_size": 8, "train.steps": 6, "train.log_every": 1, "train.eval_every": 3,
        "train.eval_batches": 2, "train.progress_bar": False, "optimizer.warmup_steps": 2, "checkpoint.every": 3,
        "checkpoint.async_save": False}


def pretrain_config(recipe: str, corpus: Path, **overrides) -> config_lib.Config:
    """A real pretraining recipe shrunk to a tiny model on the test corpus."""
    updates = dict(TINY, **{"data.data_dir": str(corpus), "data.sources": ("text:books/*.txt", "text:news.txt"),
                            "data.eval_sources": ("text:valid.txt",), "data.tokenizer_sources": ()})
    config = config_lib.load(ROOT / "configs" / f"pretrain_{recipe}.py")
    layers = {"encoder": ("model.num_encoder_layers",), "decoder": ("model.num_decoder_layers",),
              "encoder_decoder": ("model.num_encoder_layers", "model.num_decoder_layers")}[config.model.family]
    updates.update({key: 1 for key in layers})
    if config.task != "span_corruption":
        updates["data.max_target_length"] = 64
    updates.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_lib.override(config, updates)


@pytest.mark.parametrize("recipe", ["mlm", "span_corruption", "causal_lm", "mt_monolingual"])
def test_each_recipe_pretrains_and_reports_held_out_loss(recipe, corpus, tmp_path):
    config = pretrain_config(recipe, corpus)
    last = train(config, tmp_path / recipe)
    assert np.isfinite(last["loss"]) and np.isfinite(last["val_perplexity"])
    assert last["val_loss"] < last["initial_val_loss"]  # it learned something about held-out text
    # A fresh model is about uniform over the vocabulary, not confidently wrong (initialisation scale).
    assert last["initial_val_loss"] < 1.3 * np.log(config.model.vocab_size)
    tokenizer = Tokenizer.load(tmp_path / recipe / "tokenizer")
    assert tokenizer.mask_id is not None and len(tokenizer.sentinel_ids) == 100
    assert (tmp_path / recipe / "checkpoints" / "6" / "data").is_dir()


def test_resume_continues_the_data_stream_bit_identically(corpus, tmp_path):
    config = pretrain_config("causal_lm", corpus, train__eval_every=0, task="prefix_lm")
    train(config, tmp_path / "straight")
    train(config, tmp_path / "interrupted", stop_at=4)  # checkpoint at 3, and at 4 when stopping
    train(config, tmp_path / "interrupted")

    def params(workdir):
        from crosswrite_jax import sharding
        from crosswrite_jax.trainer import Trainer

        trainer = Trainer.build(config, sharding.make_mesh((-1, 1, 1)))
        manager = checkpoint.open_manager(workdir / "checkpoints", read_only=True)
        restored, _, step = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
        manager.close()
        assert step == 6
        return restored

    assert_trees_equal(params(tmp_path / "interrupted"), params(tmp_path / "straight"))


def test_fine_tuning_starts_from_pretrained_params_with_fresh_excluded_ones(corpus, tmp_path):
    config = pretrain_config("causal_lm", corpus, train__eval_every=0)
    train(config, tmp_path / "pretrained")
    from crosswrite_jax import sharding
    from crosswrite_jax.trainer import Trainer

    finetune = config_lib.override(config, {"train.init_from": str(tmp_path / "pretrained"),
                                            "train.init_exclude": ("output/.*",), "train.steps": 1,
                                            "optimizer.learning_rate": 1e-12, "optimizer.weight_decay": 0.0})
    trainer = Trainer.build(finetune, sharding.make_mesh((-1, 1, 1)))
    manager = checkpoint.open_manager(tmp_path / "pretrained" / "checkpoints", read_only=True)
    pretrained, _, _ = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
    manager.close()
    fresh = jax.device_get(trainer.init_state().params)
    train(finetune, tmp_path / "finetuned")
    manager = checkpoint.open_manager(tmp_path / "finetuned" / "checkpoints", read_only=True)
    tuned, _, _ = checkpoint.restore_params(manager, trainer.layout.abstract_with_shardings().params)
    manager.close()
    tuned, pretrained = jax.device_get(tuned), jax.device_get(pretrained)
    np.testing.assert_allclose(tuned["output"]["kernel"], fresh["output"]["kernel"], atol=1e-6)
    assert not np.allclose(tuned["output"]["kernel"], pretrained["output"]["kernel"], atol=1e-3)
    np.testing.assert_allclose(tuned["embed"]["token_embed"]["embedding"],
                               pretrained["embed"]["token_embed"]["embedding"], atol=1e-6)
    assert (tmp_path / "finetuned" / "tokenizer" / "tokenizer.json").read_text() == \
        (tmp_path / "pretrained" / "tokenizer" / "tokenizer.json").read_text()


def test_init_exclude_errors_name_the_fix(corpus, tmp_path):
    config = pretrain_config("causal_lm", corpus, train__eval_every=0, train__steps=1)
    train(config, tmp_path / "pretrained")
    base = {"train.init_from": str(tmp_path / "pretrained"), "train.steps": 1}
    with pytest.raises(UserError, match="matches no parameter"):
        train(config_lib.override(config, dict(base, **{"train.init_exclude": ("nothing/.*",)})), tmp_path / "a")
    other = config_lib.override(config, dict(base, **{"model.num_decoder_layers": 2,
                                                     "train.init_exclude": ("output/.*",)}))
    with pytest.raises(UserError, match="add patterns for them to train.init_exclude"):
        train(other, tmp_path / "b")


def test_pretraining_reads_a_tfds_dataset_through_the_same_pipeline(corpus, tmp_path):
    from test_text_sources import build_tiny_tfds

    build_tiny_tfds(tmp_path / "tfds", [corpus / "news.txt"])
    spec = f"tfds:crosswrite_tiny_text?split=train&field=text&data_dir={tmp_path / 'tfds'}"
    config = pretrain_config("causal_lm", corpus, train__eval_every=0, train__steps=2,
                            data__sources=(spec,), data__mixture_weights=())
    last = train(config, tmp_path / "run")
    assert np.isfinite(last["loss"]) and last["tokens"] > 0


def test_eval_of_a_pretraining_run_reports_held_out_perplexity_on_one_device(corpus, tmp_path, capsys):
    import json
    import subprocess
    import sys

    config = pretrain_config("causal_lm", corpus, train__eval_batches=0, train__eval_every=6)
    last = train(config, tmp_path / "run")
    code = ("import jax, json; jax.config.update('jax_num_cpu_devices', 1); from crosswrite_jax.evaluate import "
            f"evaluate; print(json.dumps(evaluate({str(tmp_path / 'run')!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert scores["devices"] == 1 and scores["task"] == "causal_lm" and scores["step"] == 6
    assert scores["tokens"] == last["val_tokens"]
    np.testing.assert_allclose(scores["perplexity"], last["val_perplexity"], rtol=1e-4)


def test_tokenizer_sources_widen_the_vocabulary_beyond_the_pretraining_text(corpus, tmp_path):
    from crosswrite_jax import workdir

    german = "Straßenbahn Kätzchen Wäscheleine Gemüsegarten Fahrradständer"
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "de.txt").write_text("\n".join([german] * 50) + "\n")
    plain = pretrain_config("span_corruption", corpus)
    widened = config_lib.override(plain, {"data.tokenizer_sources": (f"text:{tmp_path / 'extra' / 'de.txt'}",)})
    lengths, decoded = {}, {}
    for name, config in (("plain", plain), ("widened", widened)):
        run = workdir.prepare(config, tmp_path / name)
        ids = run.tokenizer.encode_batch([german])[0]
        lengths[name], decoded[name] = len(ids), run.tokenizer.decode_batch([ids])[0]
    assert decoded["widened"] == german and decoded["plain"] != german  # 'ß', 'ä' are unknown to the plain one
    assert lengths["widened"] < lengths["plain"], lengths


def test_mlm_head_on_the_first_masked_positions_only(corpus, tokenizer):
    """model.mlm_max_predictions: the same loss sums and gradients as projecting every position while the cap
    covers each row's masked positions; beyond it, each row predicts its first `cap` positions."""
    from crosswrite_jax.losses import task_losses
    from crosswrite_jax.tasks import TASKS, first_positions

    batch = {k: jnp.asarray(v) for k, v in next(iter(_dataset(corpus, tokenizer, "mlm"))).items()}
    masked_per_row = np.asarray(batch["targets"] != 0).sum(1)
    assert masked_per_row.max() < 64 and masked_per_row.min() > 2
    full = build_model(config_lib.ModelConfig(family="encoder", vocab_size=512, d_model=32, num_heads=4, d_ff=64,
                                              num_encoder_layers=1, num_decoder_layers=0, max_length=64,
                                              dropout_rate=0.0, position="learned", head="mlm"))
    params = full.init(jax.random.key(0), batch["inputs"])

    def sums(cap):
        model = full.clone(config=dataclasses.replace(full.config, mlm_max_predictions=cap))

        def loss(p):
            out = task_losses(model, TASKS["mlm"], p, batch, True, {}, 0.0)
            return out["loss_sum"], out
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, reference), reference_grads = sums(0)
    (_, capped), capped_grads = sums(int(masked_per_row.max()))
    for key in reference:
        np.testing.assert_allclose(capped[key], reference[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(reference_grads), jax.tree.leaves(capped_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    cap = int(masked_per_row.min())
    (_, short), _ = sums(cap)
    assert float(short["tokens"]) == cap * len(masked_per_row) < float(reference["tokens"])

    positions, real = first_positions(jnp.asarray([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]], bool), 3)
    assert positions[0].tolist() == [1, 3, 4] and real.tolist() == [[True] * 3, [True, False, False]]
    assert positions[1, 0] == 0


def test_mlm_max_predictions_is_for_the_mlm_head():
    with pytest.raises(UserError, match="model.mlm_max_predictions"):
        config_lib.override(config_lib.Config(), {"model.mlm_max_predictions": 8})
