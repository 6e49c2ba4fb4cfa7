"""Packed classification and tagging (data.packing): several examples share a row, told apart by segment ids. The
packed loss, gradients and predictions equal the unpacked ones; segments never see each other; a packed run trains
and evaluates end to end, scoring as unpacked."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_finetune import DECODER, _entities, _recipe, _sentiment
from test_labeled import MINILM

from crosswrite_jax import config as config_lib
from crosswrite_jax.data import labeled
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import evaluate
from crosswrite_jax.losses import task_losses
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.tasks import get_task
from crosswrite_jax.train import train

BERT_VOCAB = 30522  # the packaged MiniLM tokenizer's


@pytest.fixture(scope="module")
def bert() -> Tokenizer:
    return Tokenizer.load(MINILM)


def _examples(task: str, n: int = 13) -> list:
    """Examples of varied lengths (1 to 9 words): (text, label) or (words, tags)."""
    words = "the film was good bad very quite boring moving plot alice paris".split()
    out = []
    for i in range(n):
        chosen = [words[(i * 5 + j) % len(words)] for j in range(1 + i % 9)]
        if task == "classification":
            out.append((" ".join(chosen), str(i % 3)))
        else:
            out.append((chosen, ["B-x" if w in ("alice", "paris") else "O" for w in chosen]))
    return out


def _setup(task: str, bert: Tokenizer, family: str = "encoder", pooling: str = "first", **extra):
    """(config, model, params, examples, labels): a tiny model from the SST-2 / NER recipe, BERT's vocabulary."""
    recipe = "finetune_sst2.py" if task == "classification" else "finetune_ner_wnut17.py"
    examples = _examples(task)
    labels = labeled.label_vocabulary(task, examples)
    overrides = {"model__vocab_size": BERT_VOCAB, "model__num_encoder_layers": 2, "model__num_labels": len(labels),
                 "model__pooling": pooling, "data__max_source_length": 32, "data__bucket_lengths": (8, 16, 32), **extra}
    if family == "decoder":
        overrides.update({k.replace(".", "__"): v for k, v in DECODER.items()}, model__num_decoder_layers=2)
    config = _recipe(recipe, MINILM, **overrides)
    model = build_model(config.model)
    params = model.init(jax.random.key(1), jnp.ones((1, 8), jnp.int32))["params"]
    return config, model, params, examples, labels


def _batches(config, examples, labels, bert, packing: bool, batch_size: int = 16) -> list[dict]:
    return labeled.eval_batches(config.task, examples, bert, labels, batch_size=batch_size,
                                max_length=config.data.max_source_length, bucket_lengths=config.data.bucket_lengths,
                                packing=packing, max_segments=config.data.max_segments_per_row)


def _loss_and_grads(model, task, params, batch):
    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("example_index", "word_index")}

    def loss(p):
        sums = task_losses(model, task, {"params": p}, device_batch, True, {}, 0.0)
        return sums["loss_sum"], sums

    (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return sums, grads


def _predicted(model, task, params, batches, examples, labels) -> tuple[list, list]:
    """(predicted labels per example, the logits of each batch)."""
    logits = [np.asarray(task.forward(model, {"params": params}, {k: jnp.asarray(v) for k, v in b.items()}, True,
                                      {})[0]) for b in batches]
    ids = [np.argmax(x, axis=-1) for x in logits]
    return task.predicted_labels(batches, ids, examples, labels), logits


CASES = [("classification", "encoder", "first"), ("classification", "encoder", "mean"),
         ("classification", "decoder", "first"), ("tagging", "encoder", "first")]


@pytest.mark.parametrize("task_name, family, pooling", CASES)
def test_packed_loss_gradients_and_predictions_equal_unpacked(bert, task_name, family, pooling):
    config, model, params, examples, labels = _setup(task_name, bert, family, pooling)
    task = get_task(task_name)
    unpacked, = _batches(config, examples, labels, bert, packing=False)
    packed = _batches(config, examples, labels, bert, packing=True)
    assert len(packed) == 1 and packed[0]["inputs"].shape == (16, 32)
    assert (packed[0]["inputs_segments"].max(axis=1) > 1).sum() >= 2  # rows really hold several examples
    if task_name == "classification":
        assert packed[0]["labels"].shape == (16, 16)  # K = half the row length by default
    sums, grads = _loss_and_grads(model, task, params, unpacked)
    packed_sums, packed_grads = _loss_and_grads(model, task, params, packed[0])
    assert float(packed_sums["tokens"]) == float(sums["tokens"]) > len(examples) - 1
    for key in ("loss_sum", "correct"):
        np.testing.assert_allclose(packed_sums[key], sums[key], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), packed_grads, grads)
    predicted, logits = _predicted(model, task, params, [unpacked], examples, labels)
    packed_predicted, packed_logits = _predicted(model, task, params, packed, examples, labels)
    assert packed_predicted == predicted and None not in predicted
    if task_name == "classification":  # each segment's logits are its example's
        index = packed[0]["example_index"]
        np.testing.assert_allclose(packed_logits[0][index >= 0], logits[0][index[index >= 0]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task_name", ["classification", "tagging"])
def test_a_segment_never_sees_another_in_its_row(bert, task_name):
    config, model, params, examples, labels = _setup(task_name, bert)
    batch, = _batches(config, examples, labels, bert, packing=True)
    row = int(np.argmax(batch["inputs_segments"].max(axis=1)))  # the row with the most segments
    segments = batch["inputs_segments"][row]
    assert segments.max() >= 3
    changed = dict(batch, inputs=batch["inputs"].copy())
    first = segments == 1
    changed["inputs"][row, first] = np.where(np.arange(first.sum()) % 2, 2023, 3185)  # other words, same length
    task = get_task(task_name)
    before = np.asarray(task.forward(model, {"params": params}, batch, True, {})[0])[row]
    after = np.asarray(task.forward(model, {"params": params}, changed, True, {})[0])[row]
    if task_name == "classification":  # [K, L]: segment k's logits at k - 1
        others, mine = slice(1, int(segments.max())), 0
    else:  # [W, L]: per token
        others, mine = (segments > 1), first
    np.testing.assert_array_equal(after[others], before[others])
    assert not np.allclose(after[mine], before[mine], atol=1e-4)


def test_packed_train_batches_hold_at_most_k_segments_with_their_labels(bert):
    examples = _examples("classification", 64)
    labels = labeled.label_vocabulary("classification", examples)
    data = labeled.train_dataset("classification", examples, bert, labels, global_batch_size=4, max_length=32,
                                 bucket_lengths=(16, 32), seed=0, packing=True, max_segments=3)
    label_of = {}
    for text, label in examples:
        label_of[tuple(bert.encode_for_model([text], 32)[0])] = labels.index(label)
    for step in range(3):
        batch = data[step]
        assert batch["inputs"].shape == batch["inputs_segments"].shape == (4, 32) and batch["labels"].shape == (4, 3)
        for r in range(4):
            count = int(batch["inputs_segments"][r].max())
            assert 1 <= count <= 3 and (batch["labels"][r, count:] == -1).all()
            for s in range(1, count + 1):
                ids = batch["inputs"][r][batch["inputs_segments"][r] == s]
                assert (batch["inputs_positions"][r][batch["inputs_segments"][r] == s] == np.arange(len(ids))).all()
                assert label_of[tuple(ids.tolist())] == batch["labels"][r, s - 1]


def test_max_segments_per_row_is_checked():
    config = config_lib.Config()
    with pytest.raises(UserError, match="'data.max_segments_per_row' must be in"):
        config_lib.validate(dataclasses.replace(config, data=dataclasses.replace(config.data, max_segments_per_row=-1)))


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_packed_classification_run_trains_and_evaluates_as_unpacked(tmp_path):
    data = _sentiment(tmp_path / "data")
    config = _recipe("finetune_sst2.py", data, data__packing=True, train__steps=16, train__eval_every=8,
                     checkpoint__every=16)
    metrics = train(config, tmp_path / "run")
    assert metrics["val_accuracy"] >= 75.0 and metrics["val_examples"] == 40  # one token decides; chance is 50
    train_records = [r for r in _records(tmp_path / "run") if r["split"] == "train"]
    assert all(r["padding_fraction"] < 0.5 for r in train_records)  # 6-8 token sentences share 32-token rows

    packed = evaluate(tmp_path / "run")
    unpacked = evaluate(tmp_path / "run", overrides={"data.packing": False})
    assert packed["accuracy"] == unpacked["accuracy"] == metrics["val_accuracy"]
    np.testing.assert_allclose(packed["loss"], unpacked["loss"], rtol=1e-5)


def test_a_packed_tagging_run_scores_as_unpacked(tmp_path):
    data = _entities(tmp_path / "data")
    config = _recipe("finetune_ner_wnut17.py", data, data__packing=True, train__steps=8, train__eval_every=8,
                     checkpoint__every=8, model__num_labels=5)
    train(config, tmp_path / "run")
    packed = evaluate(tmp_path / "run")
    unpacked = evaluate(tmp_path / "run", overrides={"data.packing": False})
    assert packed["f1"] == unpacked["f1"] and packed["accuracy"] == pytest.approx(unpacked["accuracy"], rel=1e-6)
