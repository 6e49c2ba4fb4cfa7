"""`crosswrite bench` through the console script, `train.profile_steps` writing a jax.profiler trace, and the
benchmarks' own helpers."""

import importlib
import json
import sys

import pytest
from conftest import QUICKSTART, ROOT, tiny_config
from test_cli import _overrides, _run

from crosswrite_jax.errors import UserError
from crosswrite_jax.train import train


def test_bench_reports_step_time_tokens_memory_and_mfu():
    result = _run("bench", "--config", str(QUICKSTART), "--steps", "3", "--warmup", "1",
                  *_overrides({"mesh.shape": "1,1,1"}), devices=1)
    assert result.returncode == 0, result.stderr
    assert "MFU" in result.stdout and "compiled temporaries" in result.stdout
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["command"] == "bench" and record["steps"] == 3 and record["grad_accum_steps"] == 1
    assert 0 < record["median_step_s"] and record["compile_s"] > 0
    assert 0 < record["real_tokens_per_s"] <= record["padded_tokens_per_s"]
    assert record["peak_host_bytes"] > 0 and record["compiled_temp_bytes"] > 0
    assert record["peak_source"] == "measured f32 matmul" and 0 < record["mfu"] < 1
    # The documented formula and XLA's count of the compiled step (which adds the optimizer and elementwise ops).
    assert 0.5 < record["model_flops_per_step"] / record["xla_flops_per_step"] < 1.1


def test_profile_steps_write_a_trace(tmp_path):
    config = tiny_config(train__steps=4, train__profile_steps=2, checkpoint__every=4)
    train(config, tmp_path / "run")
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_profile_steps_must_not_be_negative():
    with pytest.raises(UserError, match="train.profile_steps"):
        tiny_config(train__profile_steps=-1)


def test_op_profile_ranks_the_ops_of_a_real_trace(tmp_path):
    """benchmarks/op_profile.py's parsing of this jax's Perfetto trace: the matmul of a jitted function shows up."""
    import sys
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import op_profile

    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
    a = jnp.ones((256, 256))
    jax.block_until_ready(f(a, a))
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    for _ in range(3):
        jax.block_until_ready(f(a, a))
    jax.profiler.stop_trace()
    summary = op_profile.summarize(op_profile.op_events(tmp_path), top=5)
    kinds = [kind for kind, _, _ in summary["kinds"]]
    assert summary["total_ms"] > 0 and abs(sum(share for _, _, share in summary["kinds"]) - 1) < 1e-6
    assert any("dot" in kind or "ynn" in kind or "xnn" in kind for kind in kinds), kinds
    assert op_profile.kind_of("copy_bitcast_fusion.80") == "copy_bitcast_fusion"


def test_op_profile_takes_a_recipes_batches_of_one_shape():
    """op_profile --config: the recipe's own training batches, all of the first batch's shape (one compile)."""
    import argparse
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    import op_profile

    small = ["model.vocab_size=512", "model.d_model=32", "model.num_heads=4", "model.d_ff=64",
             "model.num_encoder_layers=1", "model.num_decoder_layers=1", "train.batch_size=16"]
    args = argparse.Namespace(config=str(root / "configs" / "quickstart.py"), steps=2, overrides=small, data="")
    trainer, batches = op_profile.build(args)
    assert trainer.config.model.d_model == 32 and len(batches) == 4
    shapes = {tuple((k, v.shape) for k, v in sorted(b.items())) for b in batches}
    assert len(shapes) == 1, shapes


def _gpu_suite():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_suite

    return gpu_suite


def test_gpu_decoder_config_is_a_1b_bfloat16_llama():
    import math

    from conftest import ROOT

    from crosswrite_jax import config as config_lib
    from crosswrite_jax.models.transformer import param_shapes

    path = ROOT / "configs" / "bench_decoder_1b.py"
    config = config_lib.load(path)
    parameters = sum(math.prod(s) for s in param_shapes(config.model).values())
    assert abs(parameters - 1.04e9) / 1.04e9 < 0.02, f"{parameters:,}"
    assert config.model.dtype == "bfloat16" and config.model.family == "decoder" and config.data.packing
    assert "crosswrite bench --config configs/bench_decoder_1b.py" in path.read_text()


@pytest.mark.slow  # every GPU-suite entry compiles
def test_gpu_suite_runs_its_entries_tiny_on_cpu_and_tables_them(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path)]
    refused = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "--tiny" in refused.stderr  # no GPU: the real sizes are not attempted
    done = subprocess.run(script + ["--tiny", "--only", "decoder_1b,quickstart_bf16", "--steps", "1", "--warmup", "0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_suite.jsonl").read_text().splitlines()]
    assert [r["entry"] for r in records] == ["decoder_1b", "quickstart_bf16"]
    assert all("error" not in r and r["median_step_s"] > 0 and r["dtype"] == "bfloat16" for r in records)
    assert records[0]["family"] == "decoder" and records[0]["total_parameters"] < 1e7  # shrunk by --tiny
    table = (tmp_path / "gpu_suite.md").read_text().splitlines()
    assert table[2].startswith("| entry | step ms") and len(table) == 6
    # A spent budget skips what is left (a device call must end inside its limit) and still writes the table.
    spent = subprocess.run(script + ["--tiny", "--only", "quickstart", "--budget", "0"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert spent.returncode == 0 and "skipped: 0 s budget spent" in (tmp_path / "gpu_suite.md").read_text()


def test_gpu_suite_records_a_failing_entry_and_goes_on(monkeypatch):
    gpu_suite = _gpu_suite()
    monkeypatch.setitem(gpu_suite.ENTRIES, "broken", (gpu_suite.QUICKSTART, {"model.no_such_key": "1"}))
    record = gpu_suite.run_entry("broken", tiny=True, steps=1, warmup=0, timeout=120)
    assert record["entry"] == "broken" and "no_such_key" in record["error"]
    assert "failed" in gpu_suite.table_row(record)[1]


def _benchmark(name: str):
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def test_side_by_side_alternates_sides_and_compares_mean_seconds(capsys):
    sbs = _benchmark("side_by_side")
    order = []

    def side(name, seconds):
        def run(seed):
            order.append((name, seed))
            return {"score": 80.0 + seed, "final": 79.0, "seconds": seconds[seed]}
        return run

    summary = sbs.compare("x_vs_pytorch", "f1", steps=10, learning_rate=1e-4, examples_per_step=31.5, padded=False,
                          seeds=2, run_ours=side("ours", [100.0, 300.0]), run_pytorch=side("pytorch", [600.0, 600.0]))
    assert order == [("ours", 0), ("pytorch", 0), ("ours", 1), ("pytorch", 1)]
    assert summary["ratio"] == 3.0 and summary["ours_f1"] == [80.0, 81.0] and summary["packing"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_ner_side_by_side_labels_and_reads_each_words_first_subword():
    ner = _benchmark("ner_vs_pytorch")
    word_ids = [None, 0, 0, 1, 2, 2, None]  # [CLS] Wash ##ington is Ama ##zon [SEP]
    tag_id = {"B-LOC": 0, "O": 1, "B-ORG": 2}
    assert ner.first_subword_labels(word_ids, ["B-LOC", "O", "B-ORG"], tag_id) == [-100, 0, -100, 1, 2, -100, -100]
    # a prediction on a later subword is ignored; a fourth word cut off by truncation is "O"
    tags = ["B-LOC", "O", "B-ORG"]
    assert ner.word_predictions(word_ids, [1, 0, 2, 1, 2, 0, 1], 4, tags) == ["B-LOC", "O", "B-ORG", "O"]
