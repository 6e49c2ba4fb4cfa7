"""Where a training step's time goes: XLA ops ranked by their share of a few traced steady-state steps.

    CROSSWRITE_DATA=../shared/data python benchmarks/op_profile.py --model t5|bert [--steps 3] [--top 25]
    python benchmarks/op_profile.py --config configs/finetune_sst2.py [--steps 3]

Profiles the configurations of benchmarks/vs_pytorch.py (padded [64, 48] pairs; packed [32, 128] rows) at their
compute-equivalent shapes, or a recipe's own training batches with --config, with any --config.KEY=VALUE
overrides. The step runs under jax.profiler with a Perfetto trace;
the events of XLA's executable (one per HLO op or fusion) are summed by name and by kind (dot, fusion, gather,
scatter, ...) and printed as shares of the traced time. The trace is kept in --out for TensorBoard.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crosswrite_jax import (
    bench,  # noqa: E402
    sharding,  # noqa: E402
)
from crosswrite_jax import config as config_lib  # noqa: E402
from crosswrite_jax.sharding import to_global_batch  # noqa: E402
from crosswrite_jax.trainer import Trainer  # noqa: E402

# Trace events that are not XLA ops (the runtime's own spans) and so are left out of the op table.
_NOT_OPS = re.compile(r"^(PjitFunction|ThunkExecutor|Execute|TfrtCpu|PjRt|np\.|jit_|\$|TraceMe|Thunk::)")


def kind_of(name: str) -> str:
    """'dot.12' -> 'dot', 'loop_fusion.3' -> 'loop_fusion', 'scatter' -> 'scatter'."""
    return re.sub(r"[.\d]+$", "", name.split(":")[0]) or name


def op_events(trace_dir: Path) -> list[dict]:
    """Complete ('X') events of the newest Perfetto trace under trace_dir."""
    files = sorted(trace_dir.rglob("*.trace.json.gz"), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"error: no *.trace.json.gz under {trace_dir}; this jax wrote no Perfetto trace")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarize(events: list[dict], top: int) -> dict:
    """Per-op and per-kind time (microseconds summed over threads) and shares of the op total."""
    by_name: collections.Counter = collections.Counter()
    for e in events:
        if not _NOT_OPS.match(e["name"]):
            by_name[e["name"]] += e["dur"]
    total = sum(by_name.values()) or 1
    by_kind: collections.Counter = collections.Counter()
    for name, dur in by_name.items():
        by_kind[kind_of(name)] += dur
    return {"total_ms": total / 1e3,
            "kinds": [(k, d / 1e3, d / total) for k, d in by_kind.most_common()],
            "ops": [(n, d / 1e3, d / total) for n, d in by_name.most_common(top)]}


def build(args) -> tuple[Trainer, list]:
    if args.config:
        config = config_lib.override(config_lib.load(args.config), dict(a.split("=", 1) for a in args.overrides))
        trainer, batches, _ = bench.trainer_and_batches(config, 8 * (args.steps + 2))
        shape = {k: v.shape for k, v in batches[0].items()}
        same = [b for b in batches if {k: v.shape for k, v in b.items()} == shape]  # one compiled shape
        if len(same) < args.steps + 2:
            raise SystemExit(f"error: only {len(same)} of the first {len(batches)} batches have the first batch's "
                             f"shape; lower --steps")
        return trainer, same[:args.steps + 2]
    import vs_pytorch

    if not args.data:
        raise SystemExit("error: --model needs the data folder: set CROSSWRITE_DATA=../shared/data or pass --data")
    if args.model == "t5":
        config = vs_pytorch.t5_config(args.data, args.steps)
        batches = vs_pytorch.t5_batches(config, args.steps + 2)["padded"]
    else:
        config = vs_pytorch.bert_config(args.data, args.steps)
        batches = vs_pytorch.bert_batches(config, args.steps + 2)["padded"]
    config = config_lib.override(config, dict(a.split("=", 1) for a in args.overrides))
    return Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1])), batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("t5", "bert"), default="t5")
    parser.add_argument("--config", help="profile this recipe's training batches instead of --model's")
    parser.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=25, help="ops to list")
    parser.add_argument("--data", default=os.environ.get("CROSSWRITE_DATA", ""))
    parser.add_argument("--out", help="keep the trace here (default: a temporary folder)")
    args, rest = parser.parse_known_args()
    args.overrides = [a.removeprefix("--config.") for a in rest if a.startswith("--config.")]

    trainer, batches = build(args)
    state = trainer.init_state()
    step = trainer.jit_train_step()
    out = Path(args.out or tempfile.mkdtemp(prefix="op_profile_"))
    with trainer.context():
        device = [to_global_batch(b, trainer.mesh) for b in batches]
        for batch in device[:2]:
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        jax.profiler.start_trace(str(out), create_perfetto_trace=True)
        started = time.perf_counter()
        for batch in device[2:]:
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - started
        jax.profiler.stop_trace()
    summary = summarize(op_events(out), args.top)
    steps = len(device) - 2
    print(f"{steps} steps, {seconds / steps:.3f} s/step wall (traced); op time summed over threads "
          f"{summary['total_ms'] / steps:.0f} ms/step; trace in {out}")
    print(f"\n{'kind':<28} {'ms/step':>9} {'share':>7}")
    for kind, ms, share in summary["kinds"][:15]:
        print(f"{kind:<28} {ms / steps:>9.1f} {share:>7.1%}")
    print(f"\n{'op':<48} {'ms/step':>9} {'share':>7}")
    for name, ms, share in summary["ops"]:
        print(f"{name[:48]:<48} {ms / steps:>9.1f} {share:>7.1%}")
    print(json.dumps({"s_per_step": round(seconds / steps, 4),
                      "kinds": {k: round(s, 4) for k, _, s in summary["kinds"][:10]}}))


if __name__ == "__main__":
    main()
