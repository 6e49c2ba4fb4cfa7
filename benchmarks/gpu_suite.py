"""The GPU checks in one run: MFU of a 1B bfloat16 decoder and the levers that matter on an accelerator.

    python benchmarks/gpu_suite.py [--out DIR] [--only NAME,NAME] [--tiny] [--timeout 240] [--budget 540]

Each entry is one `crosswrite bench` in its own subprocess (an out-of-memory entry fails alone), in this order:
  decoder_1b_cudnn      configs/bench_decoder_1b.py: 1.04B parameters, bfloat16 compute, 4 rows of 2,048, with
                        cuDNN's fused flash attention (model.attention_kernel=cudnn; a CPU fails it, --tiny or not)
  decoder_1b            the same with XLA's attention (the config as it is: the flash-attention lever)
  decoder_1b_remat      the same with model.remat=full and 8 rows (twice the tokens a step, recomputed forward)
  decoder_1b_float32    the same model in float32 compute (the bfloat16 lever; its MFU is against the bf16 peak)
  quickstart            configs/quickstart.py as it is (float32), and
  quickstart_bf16       with model.dtype=bfloat16
MFU is against the GPU's dense bfloat16 peak from crosswrite_jax.flops.GPU_PEAK_FLOPS. Writes every bench's JSON
to DIR/gpu_suite.jsonl and a Markdown table to DIR/gpu_suite.md (and prints it). `--tiny` shrinks every model so
the suite runs on a CPU in a minute (the test suite does this); the figures are then meaningless.

On this project's lent GPU machine (JAX, Flax, Optax, Orbax and tokenizers are installed there; grain and its
two small dependencies are not): run benchmarks/gpu_wheels.sh here first, carry `.whl`, and run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DECODER = "configs/bench_decoder_1b.py"
QUICKSTART = "configs/quickstart.py"
ENTRIES = {
    "decoder_1b_cudnn": (DECODER, {"model.attention_kernel": "cudnn"}),
    "decoder_1b": (DECODER, {}),
    "decoder_1b_remat": (DECODER, {"model.remat": "full", "train.batch_size": "8"}),
    "decoder_1b_float32": (DECODER, {"model.dtype": "float32"}),
    "quickstart": (QUICKSTART, {}),
    "quickstart_bf16": (QUICKSTART, {"model.dtype": "bfloat16"}),
}
# --tiny: the same entries at a size a CPU runs in seconds.
TINY = {DECODER: {"model.d_model": "64", "model.d_ff": "128", "model.num_decoder_layers": "2",
                  "model.num_heads": "4", "model.num_kv_heads": "2", "model.head_dim": "16",
                  "model.max_length": "128", "data.max_source_length": "128", "data.max_target_length": "128"},
        QUICKSTART: {"model.d_model": "64", "model.d_ff": "128", "model.num_encoder_layers": "1",
                     "model.num_decoder_layers": "1", "train.batch_size": "4"}}
COLUMNS = ("entry", "step ms", "real tok/s", "MFU", "model TFLOP/s", "device peak GiB", "compile s", "loss")


def run_entry(name: str, tiny: bool, steps: int, warmup: int, timeout: float) -> dict:
    """One bench in a subprocess: its JSON record, or {'error': ...} with the end of its output."""
    config, overrides = ENTRIES[name]
    overrides = {**(TINY[config] if tiny else {}), **overrides}
    command = [sys.executable, "-m", "crosswrite_jax.cli", "bench", "--config", str(ROOT / config),
               "--steps", str(steps), "--warmup", str(warmup)] + [f"--config.{k}={v}" for k, v in overrides.items()]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"entry": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"entry": name, "error": f"exit {done.returncode}: " + " | ".join(tail)}
    record = json.loads(lines[-1])
    record.update(entry=name, overrides=overrides, wall_s=round(time.perf_counter() - started, 1))
    return record


def table_row(record: dict) -> list[str]:
    if "error" in record:
        return [record["entry"], "failed: " + record["error"][:120]] + [""] * (len(COLUMNS) - 2)
    peak = record.get("device_peak_bytes")
    mfu = record.get("mfu")
    return [record["entry"], f"{1000 * record['median_step_s']:,.1f}", f"{record['real_tokens_per_s']:,.0f}",
            f"{100 * mfu:.1f}%" if mfu is not None else "n/a", f"{record['model_flops_per_s'] / 1e12:,.1f}",
            f"{peak / 2**30:,.1f}" if peak else "n/a", f"{record['compile_s']:.1f}", f"{record['final_loss']:.3f}"]


def markdown(records: list[dict], environment: dict) -> str:
    peak = f"{environment['peak_tflops']} TFLOP/s bf16 dense" if environment["peak_tflops"] else "no table peak"
    lines = [f"GPU suite on {environment['device_kind']} x{environment['devices']} (jax {environment['jax']}, "
             f"flax {environment['flax']}), {peak}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in records]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import flax
    import jax

    from crosswrite_jax import flops

    device = jax.devices()[0]
    peak = flops.device_peak_flops(device)
    return {"jax": jax.__version__, "flax": flax.__version__, "platform": device.platform,
            "device_kind": device.device_kind, "devices": jax.device_count(),
            "peak_tflops": round(peak / 1e12, 1) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_suite"), help="folder for the results")
    parser.add_argument("--only", default="", help=f"comma-separated entries of {', '.join(ENTRIES)}")
    parser.add_argument("--tiny", action="store_true", help="shrink every model (a CPU smoke test)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per entry at most")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for the whole suite (default 540: one 10-minute device call); entries that "
                             "would start with less than 30 s left are recorded as skipped")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(ENTRIES)
    unknown = sorted(set(names) - set(ENTRIES))
    if unknown:
        parser.error(f"unknown entries {', '.join(unknown)}; choose from {', '.join(ENTRIES)}")
    env = environment()
    print(json.dumps({"environment": env}), flush=True)
    if env["platform"] == "cpu" and not args.tiny:
        print("gpu_suite: no accelerator visible to jax; run with --tiny for a CPU smoke test", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    deadline = time.monotonic() + args.budget
    with open(out / "gpu_suite.jsonl", "a") as log:
        for name in names:
            left = deadline - time.monotonic()
            if left < 30:
                record = {"entry": name, "error": f"skipped: {args.budget:.0f} s budget spent"}
            else:
                record = run_entry(name, args.tiny, args.steps, args.warmup, min(args.timeout, left))
            records.append(record)
            log.write(json.dumps({**record, "environment": env}) + "\n")
            log.flush()
            print("  ".join(table_row(record)), flush=True)
    text = markdown(records, env)
    (out / "gpu_suite.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
