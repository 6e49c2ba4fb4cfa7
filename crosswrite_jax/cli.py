"""The `crosswrite` command: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

from crosswrite_jax.errors import UserError

QUICKSTART_CONFIG = "quickstart.py"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosswrite", description="Train, evaluate and inspect Transformer runs (JAX/Flax).",
        epilog="Any command takes --config.KEY=VALUE overrides, e.g. --config.train.steps=100.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)
    debuggable = (_run_commands(commands) + _model_commands(commands) + _tool_commands(commands)
                  + [_sweep_command(commands)])
    for sub in debuggable:
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def _run_commands(commands) -> list[argparse.ArgumentParser]:
    """train, bench, eval, predict, quickstart, keys."""
    train = commands.add_parser("train", help="train (or resume) a run from a config file")
    train.add_argument("--config", required=True, help="a python config file, e.g. configs/quickstart.py")
    train.add_argument("--workdir", required=True, help="run directory; resumes from its newest checkpoint")
    train.add_argument("--profile", action="store_true",
                       help="trace a few steps with jax.profiler into WORKDIR/profile (train.profile_steps, default 5)")

    bench = commands.add_parser("bench", help="steady-state step time, tokens/s, compile time, memory and MFU")
    bench.add_argument("--config", required=True, help="a python config file, e.g. configs/quickstart.py")
    bench.add_argument("--steps", type=int, default=20, help="timed steps (median reported; default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")

    evaluate = commands.add_parser("eval", help="decode a split from a checkpoint (as decode.* say) and score it")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run directory written by `crosswrite train`")
    source.add_argument("--checkpoint", help="a run directory, its checkpoints/ or best/, or one STEP in them")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    evaluate.add_argument("--split", default=None, help="data split to decode (default: eval.split, 'test')")

    predict = commands.add_parser("predict", help="translate, continue, classify or tag each input line")
    predict.add_argument("--workdir", required=True, help="a run directory written by `crosswrite train`")
    predict.add_argument("--input", default=None, help="a text file, one input per line (default: stdin)")
    predict.add_argument("--step", type=int, default=None,
                         help="checkpoint step (default: the run's best/ checkpoint if it has one, else the newest)")
    serve = _serve_command(commands)

    quick = commands.add_parser("quickstart", help="train on the bundled Multi30k sample, then evaluate")
    quick.add_argument("--workdir", default="runs/quickstart", help="run directory (default: runs/quickstart)")

    keys = commands.add_parser("keys", help="list every config key with its value")
    keys.add_argument("--config", default=None, help="a config file (default: the base config)")
    return [train, bench, evaluate, predict, serve, quick, keys]


def _serve_command(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="an HTTP server for predict, batching concurrent requests together")
    serve.add_argument("--workdir", required=True, help="a run directory written by `crosswrite train`")
    serve.add_argument("--checkpoint", default=None,
                       help="'best', 'newest' or a STEP (default: best/ if the run has one, else the newest)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--max-batch", type=int, default=16, help="texts run together at most (default: 16)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a text waits for others to fill its batch (default: 5)")
    serve.add_argument("--batch-sizes", default="",
                       help="compiled batch sizes, e.g. 1,4,16 (default: powers of 2 below --max-batch, and it)")
    serve.add_argument("--overlong", choices=("truncate", "refuse"), default="truncate",
                       help="a text longer than the longest input: truncate it as predict does, or refuse it (413)")
    serve.add_argument("--max-texts", type=int, default=64, help="texts in one request at most (default: 64)")
    serve.add_argument("--max-chars", type=int, default=10_000, help="characters in one text at most (default: 10000)")
    serve.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                       help="continuous: texts join and leave decoding slots between steps (greedy encoder-decoder "
                            "runs); static: a batch decodes until its longest output ends (default: continuous)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="texts waiting for a batch at most; more get 503 (default: 256)")
    return serve


def _model_commands(commands) -> list[argparse.ArgumentParser]:
    """import-hf, export-hf, compile-check, peft export / merge."""
    import_hf = commands.add_parser("import-hf", help="a Hugging Face BERT / T5 / Llama directory -> a run directory")
    import_hf.add_argument("source", help="directory with config.json and model.safetensors (or an index)")
    import_hf.add_argument("out", help="new run directory: config.json, tokenizer/, checkpoints/0")

    export_hf = commands.add_parser("export-hf", help="a run's checkpoint -> config.json + model.safetensors")
    export_hf.add_argument("source", help="a run directory (newest step) or one of its checkpoints/STEP")
    export_hf.add_argument("out", help="output directory that transformers' from_pretrained loads")
    compile_check = commands.add_parser(
        "compile-check", help="compile a config's sharded train step for a TPU slice here; report memory per chip")
    compile_check.add_argument("--config", required=True, help="a python config file, e.g. configs/llama_8b_pod.py")
    compile_check.add_argument("--topology", required=True,
                               help="TPU slice: v5e-256, v5litepod-16, v4-128, v5p-128, v6e-64 or v5e:16x16")
    peft = commands.add_parser("peft", help="adapter-only checkpoints and LoRA merging of fine-tuned runs")
    peft_commands = peft.add_subparsers(dest="peft_command", required=True)
    peft_export = peft_commands.add_parser("export", help="a PEFT run's trained parameters alone -> a directory")
    peft_export.add_argument("--workdir", required=True, help="a run trained with peft.method other than full")
    peft_export.add_argument("--out", required=True, help="new directory: params/, tokenizer/, adapter.json")
    peft_export.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    peft_merge = peft_commands.add_parser("merge", help="fold LoRA adapters into the weights -> a plain run dir")
    merge_source = peft_merge.add_mutually_exclusive_group(required=True)
    merge_source.add_argument("--workdir", help="a fine-tuned run directory")
    merge_source.add_argument("--adapters", help="a directory written by `crosswrite peft export`")
    peft_merge.add_argument("--out", required=True, help="new run directory: config.json, tokenizer/, checkpoints/0")
    peft_merge.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: newest)")
    return [import_hf, export_hf, compile_check, peft, peft_export, peft_merge]


def _tool_commands(commands) -> list[argparse.ArgumentParser]:
    """report, checkpoint verify, tokenizer train."""
    report = commands.add_parser("report", help="curves of runs' metrics.jsonl as PNG files, and a summary table")
    report.add_argument("workdirs", nargs="+", help="run directories, or sweep directories (Optuna plots)")
    report.add_argument("--storage", default=None, help="a sweep's database URL, when it has no journal file")
    report.add_argument("--out", default="report", help="folder for the PNG files (default: report)")
    ckpt = commands.add_parser("checkpoint", help="inspect checkpoints offline")
    ckpt_commands = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    verify = ckpt_commands.add_parser("verify", help="check every step against its checksum manifest")
    verify.add_argument("path", help="a run directory, its checkpoints/ or one checkpoints/STEP")
    tokenizer = commands.add_parser("tokenizer", help="train subword tokenizers offline")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tokenizer_commands.add_parser("train", help="train a tokenizer on text files (one text per line)")
    tok_train.add_argument("--input", action="append", required=True, metavar="GLOB",
                           help="text files, one text per line, .gz allowed (repeatable; quote globs)")
    tok_train.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    tok_train.add_argument("--model", required=True, choices=("unigram", "bpe", "wordpiece"), help="subword model")
    tok_train.add_argument("--out", required=True, help="new directory for tokenizer.json (HF format)")
    tok_train.add_argument("--sentinels", type=int, default=100, help="<extra_id_K> tokens to add (default: 100)")
    tok_train.add_argument("--no-mask", action="store_true", help="do not add a <mask> token")
    tok_train.add_argument("--max-lines", type=int, default=None, help="read at most this many texts")
    tok_train.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    return [report, ckpt, verify, tokenizer, tok_train]


def _sweep_command(commands) -> argparse.ArgumentParser:
    sweep = commands.add_parser("sweep", help="hyperparameter search over a recipe (Optuna); rerun to resume")
    sweep.add_argument("--config", required=True, help="the recipe; its get_sweep() (if any) is the search space")
    sweep.add_argument("--workdir", required=True, help="sweep directory: study.journal, trials/NNNN, sweep.md")
    sweep.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                       help="a searched key: log(1e-4,3e-3), uniform(0,0.3), int(4,32) or choice(8,16,32) "
                            "(repeatable; replaces the recipe's get_sweep())")
    sweep.add_argument("--trials", type=int, default=12, help="finished (complete or pruned) trials (default 12)")
    sweep.add_argument("--metric", default=None, help="validation metric to optimize (default: train.best_metric)")
    sweep.add_argument("--direction", default=None, choices=("max", "min"), help="default: the metric's own")
    sweep.add_argument("--timeout", type=float, default=None, help="seconds after which no new trial starts")
    sweep.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    sweep.add_argument("--storage", default=None,
                       help="database URL shared by workers on several machines (default: DIR/study.journal)")
    sweep.add_argument("--pruner", default="median", choices=("median", "halving", "none"),
                       help="stops bad trials at a validation (default: median)")
    sweep.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    sweep.add_argument("--baseline", action="store_true",
                       help="make the first trial the recipe's own values of the searched keys, to compare against")
    sweep.add_argument("--study-name", default="", help="default: the config's name")
    sweep.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers' processes
    return sweep


def quickstart_config_path() -> Path:
    """configs/quickstart.py of a source checkout, or the copy shipped in the package."""
    checkout = Path(__file__).resolve().parent.parent / "configs" / QUICKSTART_CONFIG
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("crosswrite_jax") / "recipes" / QUICKSTART_CONFIG))


def _load_config(path: str | Path, overrides: dict[str, str]):
    from crosswrite_jax import config as config_lib
    from crosswrite_jax.tasks import check_config

    config = config_lib.override(config_lib.load(path), overrides)
    check_config(config)
    return config


def _print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_bench(args, overrides) -> dict:
    from crosswrite_jax.bench import bench, format_report

    result = bench(_load_config(args.config, overrides), steps=args.steps, warmup=args.warmup)
    print(format_report(result), flush=True)
    return result


def run_train(args, overrides) -> dict:
    from crosswrite_jax import distributed
    from crosswrite_jax.train import train

    if args.profile and "train.profile_steps" not in overrides:
        overrides = dict(overrides, **{"train.profile_steps": "5"})
    config = _load_config(args.config, overrides)
    if (code := _supervised(args, config.distributed)) is not None:
        return code
    distributed.initialize(config.distributed)  # before anything touches a backend
    started = time.perf_counter()
    metrics = train(config, args.workdir)
    if not distributed.is_main_process():
        return {}
    return {"command": "train", "workdir": str(args.workdir), "seconds": round(time.perf_counter() - started, 1),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def run_eval(args, overrides) -> dict:
    from crosswrite_jax import distributed
    from crosswrite_jax.evaluate import evaluate

    if (code := _supervised(args, _distributed_config(overrides))) is not None:
        return code
    distributed.initialize(_distributed_config(overrides))
    scores = evaluate(args.workdir, step=args.step, split=args.split, overrides=overrides,
                      checkpoint_path=args.checkpoint)
    if not distributed.is_main_process():
        return {}
    if "bleu_signature" in scores:  # translation; pretraining runs report held-out loss and perplexity
        print(scores.pop("bleu_signature"), f"BLEU = {scores['bleu']}")
        print(scores.pop("chrf_signature"), f"chrF = {scores['chrf']}")
    return scores


def _supervised(args, config) -> int | None:
    """One process of several runs as a watched child (a lost peer ends it with one line): the child's exit code.
    None for a single process, under --debug (the runtime's own output), and in the child itself."""
    from crosswrite_jax import distributed, supervise

    arguments = distributed.initialize_arguments(config)
    if arguments is None or args.debug or not supervise.needed():
        return None
    return supervise.run(supervise.cli_command(args.argv), arguments.get("process_id"),
                         arguments.get("num_processes"))


def _distributed_config(overrides: dict[str, str]):
    """The distributed.* keys of the command line over the defaults (eval has no config file)."""
    from crosswrite_jax import config as config_lib

    keys = {k: v for k, v in overrides.items() if k.startswith("distributed.")}
    return config_lib.override(config_lib.Config(), keys).distributed


def run_predict(args, overrides) -> dict:
    from crosswrite_jax.predict import predict

    summary = predict(args.workdir, input_path=args.input, step=args.step, overrides=overrides)
    print(json.dumps(summary), file=sys.stderr, flush=True)  # stdout holds the predictions only
    return {}


def run_serve(args, overrides) -> dict:
    from crosswrite_jax.serve import ServeOptions, serve

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--batch-sizes takes numbers separated by commas, e.g. 1,4,16; got {args.batch_sizes!r}")
    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           batch_sizes=sizes, overlong=args.overlong, max_texts=args.max_texts,
                           max_chars=args.max_chars, max_queue=args.max_queue, batching=args.batching)
    return serve(args.workdir, options, checkpoint=args.checkpoint, overrides=overrides)


def run_quickstart(args, overrides) -> dict:
    from crosswrite_jax.evaluate import evaluate
    from crosswrite_jax.train import train

    started = time.perf_counter()
    config = _load_config(quickstart_config_path(), overrides)
    train(config, args.workdir)
    trained = time.perf_counter()
    scores = evaluate(args.workdir, overrides={k: v for k, v in overrides.items() if k.startswith("eval.")})
    print(scores.pop("bleu_signature"), f"BLEU = {scores['bleu']}")
    print(scores.pop("chrf_signature"), f"chrF = {scores['chrf']}")
    return dict(scores, train_seconds=round(trained - started, 1),
                total_seconds=round(time.perf_counter() - started, 1))


def run_keys(args, overrides) -> dict:
    from crosswrite_jax import config as config_lib

    config = (_load_config(args.config, overrides) if args.config
              else config_lib.override(config_lib.Config(), overrides))
    for key in config_lib.all_keys(config):
        print(f"{key} = {config_lib.get(config, key)!r}")
    return {}


def run_import_hf(args, overrides) -> dict:
    from crosswrite_jax.interop import import_hf

    _no_overrides(overrides, "import-hf")
    return import_hf(args.source, args.out)


def run_export_hf(args, overrides) -> dict:
    from crosswrite_jax.interop import export_hf

    _no_overrides(overrides, "export-hf")
    return export_hf(args.source, args.out)


def run_compile_check(args, overrides) -> dict:
    from crosswrite_jax.compile_check import check_fits, compile_check, format_report

    report = compile_check(_load_config(args.config, overrides), args.topology)
    print(format_report(report), flush=True)
    check_fits(report)  # exit 2 when it would not fit
    return {"command": "compile-check", "topology": report.topology, "chips": report.chips, "fits": report.fits,
            "bytes_per_chip": report.total_bytes, "hbm_bytes": report.hbm_bytes,
            "headroom": round(report.headroom, 3), "model_flops_per_step": report.model_flops_per_step,
            "program_flops_per_step": report.program_flops_per_step,
            "compiled_flops_per_chip": report.compiled_flops_per_chip,
            "step_time_lower_bound_s": report.step_time_lower_bound_s, "mfu_ceiling": round(report.mfu_ceiling, 3),
            "lower_seconds": round(report.lower_seconds, 1), "compile_seconds": round(report.compile_seconds, 1),
            "host_peak_bytes": report.host_peak_bytes}


def run_checkpoint(args, overrides) -> dict:
    from crosswrite_jax.integrity import verify_report

    _no_overrides(overrides, "checkpoint verify")
    ok, report = verify_report(args.path)
    print(report)
    return {"command": "checkpoint verify", "ok": ok}


def run_tokenizer(args, overrides) -> dict:
    from crosswrite_jax.data.tokenizer import check_output, save_new, train_from_files

    _no_overrides(overrides, "tokenizer train")
    out = check_output(args.out, force=args.force)  # fail before training, not after
    started = time.perf_counter()
    tokenizer = train_from_files(args.input, args.vocab_size, args.model, mask=not args.no_mask,
                                 sentinels=args.sentinels, max_lines=args.max_lines)
    save_new(tokenizer, out, force=args.force)
    return {"command": "tokenizer train", "vocab_size": tokenizer.vocab_size, "model": args.model,
            "mask_id": tokenizer.mask_id, "sentinels": len(tokenizer.sentinel_ids), "out": str(out),
            "seconds": round(time.perf_counter() - started, 1)}


def run_report(args, overrides) -> dict:
    from crosswrite_jax.report import format_table, report

    _no_overrides(overrides, "report")
    sweeps = [w for w in args.workdirs if (Path(w) / "study.journal").is_file() or args.storage]
    runs = [w for w in args.workdirs if w not in sweeps]
    files = []
    if sweeps:
        from crosswrite_jax.sweep import plot_sweep

        for workdir in sweeps:
            files += plot_sweep(workdir, args.out, args.storage)
    rows = []
    if runs:
        rows, run_files = report(runs, args.out)
        files += run_files
        print(format_table(rows))
    return {"command": "report", "runs": len(rows), "sweeps": len(sweeps), "files": [str(f) for f in files]}


def run_sweep(args, overrides) -> dict:
    from crosswrite_jax import config as config_lib
    from crosswrite_jax import sweep as sweep_lib

    config = _load_config(args.config, overrides)
    if args.space:
        pairs = [item.partition("=") for item in args.space]
        bad = [key for key, eq, _ in pairs if not eq]
        if bad:
            raise UserError(f"--space {bad[0]!r} has no '='; write --space KEY=SPEC, e.g. "
                            f"--space optimizer.learning_rate='log(1e-4,3e-3)'")
        space = {key.strip().removeprefix("config."): spec for key, _, spec in pairs}
    else:
        space = config_lib.call_recipe(args.config, "get_sweep") or {}
    if args.trials < 1 or args.workers < 1:
        raise UserError("--trials and --workers must be at least 1")
    metric, direction = sweep_lib.resolve_metric(config, args.metric, args.direction)
    sweep = sweep_lib.Sweep(config=config, workdir=Path(args.workdir), space=sweep_lib.parse_space(space, config),
                            metric=metric, direction=direction, trials=args.trials, storage_url=args.storage,
                            seed=args.seed, pruner=args.pruner, timeout=args.timeout, study_name=args.study_name,
                            recipe=args.config, overrides=tuple(f"--config.{k}={v}" for k, v in overrides.items()),
                            baseline=args.baseline)
    if args.worker:
        sweep_lib.work(sweep)
        return {}
    worker = [sys.executable, "-m", "crosswrite_jax.cli", *_without_option(args.argv, "--workers"), "--worker"]
    return sweep_lib.run_sweep(sweep, args.workers, worker if args.workers > 1 else None)


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv less one option and its value (`--name V` or `--name=V`)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == name:
            skip = True
        elif not word.startswith(f"{name}="):
            out.append(word)
    return out


def run_peft(args, overrides) -> dict:
    from crosswrite_jax import adapters

    _no_overrides(overrides, f"peft {args.peft_command}")
    if args.peft_command == "export":
        return adapters.export_adapters(args.workdir, args.out, args.step)
    return adapters.merge(args.out, workdir=args.workdir, adapters=args.adapters, step=args.step)


def _no_overrides(overrides: dict, command: str) -> None:
    if overrides:
        raise UserError(f"{command} takes no --config overrides (got {next(iter(overrides))})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    for noisy in ("orbax", "jax._src", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from crosswrite_jax.config import parse_overrides

        overrides = parse_overrides(rest)
        if args.command != "bench":  # bench measures compilation; everything else may reuse it
            from crosswrite_jax import compile_cache

            folder = compile_cache.enable_default()
            if args.command in ("train", "quickstart"):
                logging.getLogger("crosswrite_jax").info("XLA compilation cache: %s", folder or "off")
        handler = {"train": run_train, "eval": run_eval, "predict": run_predict, "quickstart": run_quickstart,
                   "serve": run_serve,
                   "keys": run_keys, "import-hf": run_import_hf, "export-hf": run_export_hf,
                   "checkpoint": run_checkpoint, "tokenizer": run_tokenizer, "compile-check": run_compile_check,
                   "bench": run_bench,
                   "peft": run_peft, "report": run_report, "sweep": run_sweep}
        result = handler[args.command](args, overrides)
        if isinstance(result, int):  # a supervised child's exit code; it printed its own output
            return result
    except UserError as error:
        if args.debug:
            raise
        print(f"crosswrite: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crosswrite: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # an unwritable --workdir, a missing or unreadable file, a full disk
        if args.debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"crosswrite: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug, not bad input: one line, the traceback behind --debug
        if args.debug:
            raise
        message = " ".join(str(error).split())[:300]
        print(f"crosswrite: internal error: {type(error).__name__}: {message}; rerun with --debug for the traceback",
              file=sys.stderr)
        return 1
    if result:
        _print_json(result)
    return 1 if result.get("ok") is False else 0


def run() -> None:
    """The `crosswrite` command: `main`, then an exit without the interpreter's native teardown.

    When `main` returns, every checkpoint, metrics file and event writer is closed; the exit handlers still run
    (jax.distributed's shutdown among them). What is skipped is the destruction of native library state (XLA's
    thread pools, tensorstore, tokenizers) in whatever order interpreter exit reaches it, which has crashed a run
    with SIGSEGV after its last checkpoint was written.
    """
    from crosswrite_jax import supervise

    supervise.die_with_parent()  # a watched child of a multi-process run dies with its parent
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
