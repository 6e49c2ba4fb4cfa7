"""Load test of `crosswrite serve`: N concurrent clients over real HTTP, dynamic batching against one request at a
time, and against `predict` without a server.

    python benchmarks/serve_load.py [--workdir runs/quickstart] [--clients 16] [--requests 400] [--port 8123]
        [--max-batch 16] [--max-wait-ms 5]

Each request carries one sentence of the run's test split (test_2016_flickr for the quickstart). For each server
mode (continuous batching with `--max-batch 16 --max-wait-ms 5`, the same with `--batching static`, then one
request at a time: `--batching static --max-batch 1`) the script starts `crosswrite serve`, waits for it
to be ready (compiled), sends a few warm-up requests, then lets --clients threads (http.client, keep-alive) send
--requests requests as fast as answers come, and stops the server with SIGTERM. With the server gone it runs the
same sentences through predict's code in this process: once as `crosswrite predict` does (eval.batch_size rows
per batch) and once as a loop of one-sentence calls; then continuous batching's decoding loop alone (no HTTP, the
same slots refilled as texts end). All six must give the same outputs. "texts per batch" is, for
continuous batching, the texts decoding together in an average step.

Without a run at --workdir it trains the quickstart for 200 steps into runs/serve_load_quickstart200 (and says so).
Prints a table and a JSON line. Not a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT_RUN = ROOT / "runs" / "serve_load_quickstart200"


def ensure_run(workdir: Path) -> tuple[Path, str]:
    """The run to serve, and a note on where it came from."""
    if (workdir / "checkpoints").is_dir() and any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()):
        return workdir, f"run {workdir}"
    if not (SHORT_RUN / "checkpoints").is_dir():
        print(f"no trained run at {workdir}: training the quickstart for 200 steps into {SHORT_RUN} "
              f"(--config.train.steps=200)", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "crosswrite_jax.cli", "train", "--config",
                        str(ROOT / "configs" / "quickstart.py"), "--workdir", str(SHORT_RUN),
                        "--config.train.steps=200", "--config.train.progress_bar=false"], check=True)
        print(f"trained in {time.perf_counter() - started:.0f}s", flush=True)
    return SHORT_RUN, f"no run at {workdir}; a quickstart run trained for 200 steps (--config.train.steps=200)"


def sentences(workdir: Path, count: int) -> list[str]:
    from crosswrite_jax.workdir import load_run

    run = load_run(workdir)
    sources, _ = run.read_references(run.config.eval.split, count)
    return sources


class ServerProcess:
    def __init__(self, workdir: Path, port: int, args: list[str]):
        self.port = port
        self.log_path = workdir.parent / f"serve_load-{port}.log"
        started = time.perf_counter()
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "crosswrite_jax.cli", "serve", "--workdir",
                                             str(workdir), "--port", str(port), *args], stdout=log,
                                            stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"serve exited:\n{self.log_path.read_text()}")
            try:
                status, _ = request(port, "GET", "/healthz")
                if status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def request(port: int, method: str, path: str, body: dict | None = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if own:
            connection.close()


def drive(port: int, texts: list[str], clients: int) -> dict:
    """`clients` threads send one text per request until every text is answered; latencies and throughput."""
    outputs: list = [None] * len(texts)
    latencies: list[float] = []
    next_index = iter(range(len(texts)))
    lock = threading.Lock()
    errors: list[str] = []

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            sent = time.perf_counter()
            status, body = request(port, "POST", "/v1/predict", {"texts": [texts[i]]}, connection)
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                errors.append(f"{status}: {body}")
                continue
            outputs[i] = body["outputs"][0]["output"]
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    latencies.sort()
    return {"requests_per_s": len(texts) / seconds, "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99), "seconds": seconds, "outputs": outputs}


def percentile(sorted_values: list[float], q: float) -> float:
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


def serve_mode(workdir: Path, port: int, args: list[str], texts: list[str], clients: int) -> dict:
    server = ServerProcess(workdir, port, args)
    for text in texts[:clients]:  # warm-up: the first requests of each shape
        request(port, "POST", "/v1/predict", {"texts": [text]})
    result = drive(port, texts, clients)
    status, model = request(port, "GET", "/v1/model")
    code = server.stop()
    batching = model["batching"]
    together = (batching["slot_steps"] / max(batching["decode_steps"], 1) if model["batching_mode"] == "continuous"
                else batching["batched_texts"] / max(batching["batches"], 1))  # texts decoded together, on average
    result.update(startup_s=server.startup_seconds, exit_code=code, batches=batching["batches"],
                  texts_per_batch=together, mode=model["batching_mode"],
                  step=model["step"], checkpoint=model["checkpoint"], compiled_shapes=len(model["compiled_shapes"]))
    return result


def predict_modes(workdir: Path, texts: list[str]) -> dict[str, dict]:
    """predict's own code path in this process: whole batches (as `crosswrite predict`), and one text per call."""
    import io

    from crosswrite_jax import compile_cache
    from crosswrite_jax.predict import load_predictor, write_predictions

    compile_cache.enable_default()
    predictor = load_predictor(workdir)
    out = io.StringIO()
    write_predictions(predictor, texts, out)  # compiles every width once
    out = io.StringIO()
    started = time.perf_counter()
    write_predictions(predictor, texts, out)
    batched = time.perf_counter() - started
    for text in texts[:8]:
        predictor.outputs([text], rows=1)
    latencies, loop_outputs = [], []
    started = time.perf_counter()
    for text in texts:
        sent = time.perf_counter()
        loop_outputs.append(predictor.outputs([text], rows=1)[0]["output"])
        latencies.append(time.perf_counter() - sent)
    loop = time.perf_counter() - started
    latencies.sort()
    return {"predict file": {"requests_per_s": len(texts) / batched, "p50_ms": None, "p99_ms": None,
                             "seconds": batched, "outputs": out.getvalue().splitlines(),
                             "rows": predictor.rows},
            "predict loop": {"requests_per_s": len(texts) / loop, "p50_ms": 1000 * percentile(latencies, 50),
                             "p99_ms": 1000 * percentile(latencies, 99), "seconds": loop, "outputs": loop_outputs}}


def slots_mode(workdir: Path, texts: list[str], rows: int) -> dict:
    """Continuous batching's decoding loop in this process, without HTTP: `rows` slots, refilled as texts end."""
    import numpy as np

    from crosswrite_jax.predict import load_predictor
    from crosswrite_jax.slots import SlotDecoder

    predictor = load_predictor(workdir)
    r = predictor.restored
    decoder = SlotDecoder(r.model, r.params, rows, max(predictor.widths()), r.run.config.eval.max_decode_length,
                          r.run.tokenizer.eos_id)

    def run(batch: list[str]) -> tuple[list[str], float]:
        waiting, occupant, done = list(range(len(batch))), {}, {}
        started = time.perf_counter()
        with r.context():
            state = decoder.start()
            while waiting or occupant:
                free = [s for s in range(rows) if s not in occupant][:len(waiting)]
                if free:
                    joining = [waiting.pop(0) for _ in free]
                    ids = predictor.source_ids([batch[i] for i in joining])
                    state = decoder.join(state, ids, np.array(free, np.int32))
                    occupant.update(zip(free, joining))
                state, _ = decoder.advance(state, decoder.max_new)
                running, out = decoder.outputs(state)
                ended = [s for s in occupant if not running[s]]
                for s, output in zip(ended, predictor.generated_outputs(out[ended])):
                    done[occupant.pop(s)] = output["output"]
        return [done[i] for i in range(len(batch))], time.perf_counter() - started

    run(texts)  # compiles the shapes this order needs
    outputs, seconds = run(texts)
    return {"requests_per_s": len(texts) / seconds, "p50_ms": None, "p99_ms": None, "seconds": seconds,
            "outputs": outputs, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

    workdir, origin = ensure_run(Path(args.workdir))
    texts = sentences(workdir, args.requests)
    batched = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    modes = {
        f"serve, continuous batching ({' '.join(batched)})":
            serve_mode(workdir, args.port, batched, texts, args.clients),
        f"serve, static batching (--batching static {' '.join(batched)})":
            serve_mode(workdir, args.port + 1, ["--batching", "static", *batched], texts, args.clients),
        "serve, one request at a time (--batching static --max-batch 1)":
            serve_mode(workdir, args.port + 2, ["--batching", "static", "--max-batch", "1"], texts, args.clients),
    }
    modes.update(predict_modes(workdir, texts))
    modes[f"decoding slots in this process, no HTTP ({args.max_batch} rows)"] = slots_mode(workdir, texts,
                                                                                            args.max_batch)
    reference = next(iter(modes.values()))["outputs"]
    identical = all(m["outputs"] == reference for m in modes.values())
    dynamic, static, single = list(modes.values())[:3]
    speedup = dynamic["requests_per_s"] / single["requests_per_s"]

    print(f"\n{origin}; step {dynamic['step']} from {dynamic['checkpoint']}; {len(texts)} requests of one sentence "
          f"each, {args.clients} concurrent clients over HTTP\n")
    print("| mode | requests/s | p50 latency | p99 latency | texts per batch | start-up (compile) |")
    print("|---|---|---|---|---|---|")
    for name, m in modes.items():
        p50 = f"{m['p50_ms']:.0f} ms" if m["p50_ms"] is not None else "-"
        p99 = f"{m['p99_ms']:.0f} ms" if m["p99_ms"] is not None else "-"
        per_batch = f"{m['texts_per_batch']:.1f}" if "texts_per_batch" in m else (
            f"{m['rows']} rows" if "rows" in m else "1")
        startup = f"{m['startup_s']:.0f} s ({m['compiled_shapes']} shapes)" if "startup_s" in m else "-"
        print(f"| {name} | {m['requests_per_s']:.1f} | {p50} | {p99} | {per_batch} | {startup} |")
    print(f"\ncontinuous batching / one at a time: {speedup:.2f}x requests/s (target >= 4x); static batching / one "
          f"at a time: {static['requests_per_s'] / single['requests_per_s']:.2f}x; outputs identical across "
          f"all modes: {identical}; server exit codes after SIGTERM: "
          f"{[m['exit_code'] for m in modes.values() if 'exit_code' in m]}")
    summary = {"origin": origin, "requests": len(texts), "clients": args.clients, "speedup": round(speedup, 2),
               "static_speedup": round(static["requests_per_s"] / single["requests_per_s"], 2),
               "identical": identical,
               **{name: {k: (round(v, 1) if isinstance(v, float) else v) for k, v in m.items() if k != "outputs"}
                  for name, m in modes.items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
