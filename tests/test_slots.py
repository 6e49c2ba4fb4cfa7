"""Decoding slots (continuous batching): texts that join and leave rows between steps decode exactly as greedy
decoding decodes each of them alone, with every row at its own position."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn

from crosswrite_jax.decode import greedy_decode
from crosswrite_jax.models.transformer import PAD_ID, EncoderDecoder
from crosswrite_jax.slots import SlotDecoder

EOS, MAX_NEW = 1, 12


def _model(scan_layers: bool):
    config = tiny_config(model__dropout_rate=0.0, model__tie_output_embedding=False,
                         model__scan_layers=scan_layers).model
    model = EncoderDecoder(config)
    inputs = np.array(jax.random.randint(jax.random.key(1), (6, 9), 3, config.vocab_size))
    inputs[0, 6:] = PAD_ID
    inputs[3, 4:] = PAD_ID
    inputs[:, -1] = np.where(inputs[:, -2] == PAD_ID, PAD_ID, EOS)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), inputs, inputs))["params"]
    # A sharper output layer, its EOS column three times sharper still: texts end at different steps.
    kernel = (params["output"]["kernel"] * 8.0).at[:, EOS].multiply(3.0)
    return model, dict(params, output=dict(params["output"], kernel=kernel)), inputs


@pytest.mark.parametrize("scan_layers", [False, True])
def test_texts_joining_and_leaving_between_steps_decode_as_each_alone(scan_layers):
    model, params, inputs = _model(scan_layers)
    alone = np.concatenate([np.asarray(greedy_decode(model, params, inputs[i:i + 1], MAX_NEW, EOS))
                            for i in range(len(inputs))])
    lengths = [int(np.argmax(row == EOS)) + 1 if (row == EOS).any() else MAX_NEW for row in alone]
    assert len(set(lengths)) > 1 and min(lengths) < MAX_NEW  # outputs end at different steps

    slots = SlotDecoder(model, params, rows=3, width=inputs.shape[1], max_new=MAX_NEW, eos_id=EOS)
    state = slots.start()
    waiting, occupant, got, calls, widths = list(range(len(inputs))), {}, {}, 0, set()
    state = slots.join(state, inputs[:1], np.array([1]))  # one text first, the others join while it decodes
    occupant[1] = waiting.pop(0)
    state, taken = slots.advance(state, 3)
    assert int(taken) == min(3, lengths[0])
    while waiting or occupant:
        free = [s for s in range(3) if s not in occupant][:len(waiting)]
        if free:
            joining = [waiting.pop(0) for _ in free]
            width = max(int(np.flatnonzero(inputs[i] != PAD_ID).max()) + 1 for i in joining)  # each group its own
            filler = np.full((1, width), PAD_ID)  # a filler row (slot index 3) is dropped
            state = slots.join(state, np.concatenate([inputs[joining, :width], filler]), np.array(free + [3]))
            widths.add(width)
            occupant.update(zip(free, joining))
        before = dict(occupant)
        state, taken = slots.advance(state, MAX_NEW)
        calls += 1
        running, out = slots.outputs(state)
        ended = [s for s in before if not running[s]]
        assert ended and all(running[s] for s in before if s not in ended)  # it stops when a row ends
        for s in ended:
            got[occupant.pop(s)] = out[s]
    np.testing.assert_array_equal(np.stack([got[i] for i in range(len(inputs))]), alone)
    assert calls > 2 and len(widths) > 1  # rows were reused, by sources of different widths


def test_an_idle_decoder_takes_no_steps_and_filler_rows_never_run():
    model, params, inputs = _model(False)
    slots = SlotDecoder(model, params, rows=2, width=inputs.shape[1], max_new=MAX_NEW, eos_id=EOS)
    state = slots.join(slots.start(), inputs[:2], np.array([2, 2]))  # both rows are filler
    state, taken = slots.advance(state, MAX_NEW)
    running, out = slots.outputs(state)
    assert int(taken) == 0 and not running.any() and (out == PAD_ID).all()


def test_slots_on_a_restored_run_sharded_over_8_devices_equal_predict(tmp_path):
    from crosswrite_jax.predict import load_predictor
    from crosswrite_jax.train import train

    train(tiny_config(train__steps=2, checkpoint__every=2, optimizer__learning_rate=1e-6,
                      model__tie_output_embedding=False), tmp_path / "run")
    predictor = load_predictor(tmp_path / "run")
    restored = predictor.restored
    texts = ["A man rides a bike.", "Two dogs play in the snow near a red house.", "Hello", "A boat on a lake."]
    expected = [o["output"] for o in predictor.outputs(texts, rows=8)]
    assert jax.device_count() == 8 and len(set(expected)) > 2
    with restored.context():
        slots = SlotDecoder(restored.model, restored.params, rows=8, width=max(predictor.widths()),
                            max_new=restored.run.config.eval.max_decode_length, eos_id=restored.run.tokenizer.eos_id)
        state = slots.join(slots.start(), predictor.source_ids(texts[:3]), np.array([0, 5, 8]))  # 8: filler
        state, _ = slots.advance(state, 2)
        state = slots.join(state, predictor.source_ids(texts[3:]), np.array([2]))  # joins two steps later
        done = {}
        while len(done) < 3:
            state, _ = slots.advance(state, 100)
            running, out = slots.outputs(state)
            done.update({s: out[s] for s in (0, 2, 5) if not running[s] and s not in done})
    got = [o["output"] for o in predictor.generated_outputs(np.stack([done[0], done[5], done[2]]))]
    assert got == [expected[0], expected[1], expected[3]]


def test_a_failed_join_fails_the_texts_already_decoding_and_the_server_decodes_on(tmp_path):
    from crosswrite_jax.predict import load_predictor
    from crosswrite_jax.serve import ServeOptions, SlotBatcher
    from crosswrite_jax.train import train

    train(tiny_config(train__steps=2, checkpoint__every=2, optimizer__learning_rate=1e-6,
                      model__tie_output_embedding=False), tmp_path / "run")
    predictor = load_predictor(tmp_path / "run")
    batcher = SlotBatcher(predictor, ServeOptions(max_batch=4, max_wait_ms=0))
    batcher.compile()
    answers = {}
    done = lambda name: lambda outputs, error: answers.update({name: (outputs, error)})  # noqa: E731
    batcher.submit(["A man rides a bike."], None, done("first"))
    batcher._join(list(batcher._queue))  # the worker's steps, driven by hand: one text decoding...
    batcher._queue.clear()
    batcher._advance = lambda: None
    real_join, calls = batcher.decoder.join, []

    def failing_join(*args):
        calls.append(1)
        raise RuntimeError("device lost")

    batcher.decoder.join = failing_join
    batcher.submit(["Two dogs play."], None, done("second"))
    batcher._join(list(batcher._queue))  # ...when the next text's join fails on the device
    batcher._queue.clear()
    assert calls == [1] and set(answers) == {"first", "second"}
    assert all(outputs is None and "device lost" in str(error) for outputs, error in answers.values())
    assert not batcher._busy() and batcher.counters["errors"] == 2

    batcher.decoder.join = real_join  # fresh slots decode the next text as predict does
    del batcher._advance
    batcher.submit(["Hello"], None, done("third"))
    batcher._join(list(batcher._queue))
    batcher._queue.clear()
    while batcher._busy():
        batcher._advance()
    assert answers["third"][1] is None
    assert answers["third"][0][0]["output"] == predictor.outputs(["Hello"], rows=8)[0]["output"]
