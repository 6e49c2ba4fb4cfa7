"""Decoding from checkpoints: `crosswrite eval --checkpoint` on one device scores an 8-device checkpoint the same,
and `crosswrite predict` writes one line per input line for encoder-decoder and decoder-only runs."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn

from crosswrite_jax import cli
from crosswrite_jax.errors import UserError
from crosswrite_jax.evaluate import evaluate, resolve
from crosswrite_jax.models import hf, presets
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.predict import predict

CROSSWRITE = shutil.which("crosswrite") or str(Path(sys.executable).parent / "crosswrite")
SOURCES = ["A man rides a bike.", "", "Two dogs play in the snow near a red house.", "A woman sings.", "Hello",
           "Children are running.", "A boat.", "The sun sets over the sea.", "Ein Mann.", "A cat sleeps on a chair."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny translation run trained for 2 steps on the 8-device test mesh, so slowly that its random untied
    output layer still writes long random translations (which any numerical difference would change)."""
    from crosswrite_jax.train import train

    workdir = tmp_path_factory.mktemp("predict") / "run"
    train(tiny_config(train__steps=2, checkpoint__every=2, optimizer__learning_rate=1e-6, eval__max_examples=16,
                      model__tie_output_embedding=False), workdir)
    return workdir


def test_an_8_device_checkpoint_scores_the_same_on_one_device(trained):
    overrides = {"decode.beam_size": 2}
    here = evaluate(trained, overrides=overrides)
    assert here["devices"] == 8 and here["decoding"].startswith("beam2")
    hypotheses = Path(here["hypotheses_file"]).read_text()
    assert len(set(hypotheses.splitlines())) > 8  # distinct, non-trivial translations
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_NUM_CPU_DEVICES="1",
               JAX_PLATFORMS="cpu", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    done = subprocess.run([CROSSWRITE, "eval", "--checkpoint", str(trained / "checkpoints" / "2"),
                           "--config.decode.beam_size=2"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    there = json.loads(done.stdout.strip().splitlines()[-1])  # the output ends with one JSON line of metrics
    assert there["devices"] == 1 and there["step"] == 2 and there["examples"] == 16
    assert there["bleu"] == here["bleu"] and there["chrf"] == here["chrf"]
    assert Path(there["hypotheses_file"]).read_text() == hypotheses

    assert resolve(None, trained / "checkpoints", None) == (trained, None, trained / "checkpoints")
    assert resolve(None, trained / "checkpoints" / "2", None) == (trained, 2, trained / "checkpoints")
    with pytest.raises(UserError, match="is step 2 but --step is 3"):
        resolve(None, trained / "checkpoints" / "2", 3)
    with pytest.raises(UserError, match="exactly one of --workdir"):
        resolve(trained, trained, None)


def test_predict_cli_writes_one_line_per_input_line_in_order(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("\n".join(SOURCES) + "\n").encode())))
    assert cli.main(["predict", "--workdir", str(trained), "--config.eval.batch_size=3"]) == 0  # 2 batches of 8
    from_stdin = capsys.readouterr()
    lines = from_stdin.out.splitlines()
    assert len(lines) == len(SOURCES) and any(lines)
    assert json.loads(from_stdin.err.strip().splitlines()[-1])["lines"] == len(SOURCES)

    (tmp_path / "in.txt").write_text("\n".join(SOURCES[2:5][::-1]) + "\n")  # the same sentences, reordered
    assert cli.main(["predict", "--workdir", str(trained), "--input", str(tmp_path / "in.txt")]) == 0
    assert capsys.readouterr().out.splitlines() == lines[2:5][::-1]

    assert cli.main(["predict", "--workdir", str(trained), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "--input" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"A man.\nA caf\xe9.\n", "in.txt:2: not UTF-8 text (byte 0xe9 at column 6)"),
    (b"\x00\x01\x02binary\n", "in.txt:1: holds NUL bytes"),
])
def test_predict_refuses_input_that_is_not_utf8_text_naming_the_line(trained, tmp_path, capsys, content, message):
    (tmp_path / "in.txt").write_bytes(content)
    assert cli.main(["predict", "--workdir", str(trained), "--input", str(tmp_path / "in.txt")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("crosswrite: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_predict_counts_the_inputs_it_cut(trained, tmp_path, capsys, caplog):
    long = " ".join(["word"] * 200)
    (tmp_path / "in.txt").write_text(f"A man.\n{long}\n{long} again\n")
    assert cli.main(["predict", "--workdir", str(trained), "--input", str(tmp_path / "in.txt")]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["lines"] == 3 and summary["truncated"] == 2
    assert "2 inputs longer than 32 tokens were cut" in caplog.text


def test_predict_continues_prompts_with_a_decoder_only_run(trained, tmp_path):
    from crosswrite_jax.interop import import_hf

    config = presets.llama(vocab_size=512, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, num_decoder_layers=1)
    init = jax.jit(build_model(config).init)
    params = nn.unbox(init(jax.random.key(0, impl="unsafe_rbg"), np.ones((1, 4), np.int32)))["params"]
    params = jax.tree.map(np.asarray, params)
    hf.write_checkpoint(tmp_path / "hf", hf.config_to_hf("llama", config), hf.params_to_hf("llama", config, params))
    import_hf(tmp_path / "hf", tmp_path / "lm")
    saved = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert saved["task"] == "causal_lm"  # an imported decoder gets its family's pretraining task
    shutil.copytree(trained / "tokenizer", tmp_path / "lm" / "tokenizer")
    (tmp_path / "prompts.txt").write_text("\n".join(SOURCES[:5]) + "\n")
    out = io.StringIO()
    summary = predict(tmp_path / "lm", input_path=tmp_path / "prompts.txt", out=out,
                      overrides={"eval.max_decode_length": "6", "decode.sample": "true", "decode.top_k": "5"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and summary["lines"] == 5 and summary["decoding"].startswith("sample") and any(lines)
    with pytest.raises(UserError, match="data.eval_sources' is empty"):  # held-out text is what eval scores
        evaluate(tmp_path / "lm")

    # A run trained with cuDNN attention on a GPU decodes here too, with XLA's kernel (the same math).
    saved["model"].update(attention_kernel="cudnn", dtype="bfloat16")
    (tmp_path / "lm" / "config.json").write_text(json.dumps(saved))
    out = io.StringIO()
    assert predict(tmp_path / "lm", input_path=tmp_path / "prompts.txt", out=out,
                   overrides={"eval.max_decode_length": "6"})["lines"] == 5
    assert len(out.getvalue().splitlines()) == 5
