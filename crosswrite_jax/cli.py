"""The `crosswrite` command: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
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

    train = commands.add_parser("train", help="train (or resume) a run from a config file")
    train.add_argument("--config", required=True, help="a python config file, e.g. configs/quickstart.py")
    train.add_argument("--workdir", required=True, help="run directory; resumes from its newest checkpoint")

    evaluate = commands.add_parser("eval", help="decode a split from a checkpoint and score it")
    evaluate.add_argument("--workdir", required=True, help="a run directory written by `crosswrite train`")
    evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    evaluate.add_argument("--split", default=None, help="data split to decode (default: eval.split, 'test')")

    quick = commands.add_parser("quickstart", help="train on the bundled Multi30k sample, then evaluate")
    quick.add_argument("--workdir", default="runs/quickstart", help="run directory (default: runs/quickstart)")

    keys = commands.add_parser("keys", help="list every config key with its value")
    keys.add_argument("--config", default=None, help="a config file (default: the base config)")

    import_hf = commands.add_parser("import-hf", help="a Hugging Face BERT / T5 / Llama directory -> a run directory")
    import_hf.add_argument("source", help="directory with config.json and model.safetensors (or an index)")
    import_hf.add_argument("out", help="new run directory: config.json, tokenizer/, checkpoints/0")

    export_hf = commands.add_parser("export-hf", help="a run's checkpoint -> config.json + model.safetensors")
    export_hf.add_argument("source", help="a run directory (newest step) or one of its checkpoints/STEP")
    export_hf.add_argument("out", help="output directory that transformers' from_pretrained loads")
    ckpt = commands.add_parser("checkpoint", help="inspect checkpoints offline")
    ckpt_commands = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    verify = ckpt_commands.add_parser("verify", help="check every step against its checksum manifest")
    verify.add_argument("path", help="a run directory, its checkpoints/ or one checkpoints/STEP")
    for sub in (train, evaluate, quick, keys, import_hf, export_hf, ckpt, verify):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def quickstart_config_path() -> Path:
    """configs/quickstart.py of a source checkout, or the copy shipped in the package."""
    checkout = Path(__file__).resolve().parent.parent / "configs" / QUICKSTART_CONFIG
    if checkout.is_file():
        return checkout
    return Path(str(resources.files("crosswrite_jax") / "recipes" / QUICKSTART_CONFIG))


def _load_config(path: str | Path, overrides: dict[str, str]):
    from crosswrite_jax import config as config_lib

    return config_lib.override(config_lib.load(path), overrides)


def _print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_train(args, overrides) -> dict:
    from crosswrite_jax.train import train

    config = _load_config(args.config, overrides)
    started = time.perf_counter()
    metrics = train(config, args.workdir)
    return {"command": "train", "workdir": str(args.workdir), "seconds": round(time.perf_counter() - started, 1),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def run_eval(args, overrides) -> dict:
    from crosswrite_jax.evaluate import evaluate

    scores = evaluate(args.workdir, step=args.step, split=args.split, overrides=overrides)
    print(scores.pop("bleu_signature"), f"BLEU = {scores['bleu']}")
    print(scores.pop("chrf_signature"), f"chrF = {scores['chrf']}")
    return scores


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

    config = _load_config(args.config, overrides) if args.config else config_lib.override(config_lib.Config(), overrides)
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


def run_checkpoint(args, overrides) -> dict:
    from crosswrite_jax.integrity import verify_report

    _no_overrides(overrides, "checkpoint verify")
    ok, report = verify_report(args.path)
    print(report)
    return {"command": "checkpoint verify", "ok": ok}


def _no_overrides(overrides: dict, command: str) -> None:
    if overrides:
        raise UserError(f"{command} takes no --config overrides (got {next(iter(overrides))})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    for noisy in ("orbax", "jax._src", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from crosswrite_jax.config import parse_overrides

        overrides = parse_overrides(rest)
        handler = {"train": run_train, "eval": run_eval, "quickstart": run_quickstart, "keys": run_keys,
                   "import-hf": run_import_hf, "export-hf": run_export_hf, "checkpoint": run_checkpoint}
        result = handler[args.command](args, overrides)
    except UserError as error:
        if args.debug:
            raise
        print(f"crosswrite: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crosswrite: interrupted", file=sys.stderr)
        return 130
    if result:
        _print_json(result)
    return 1 if result.get("ok") is False else 0


if __name__ == "__main__":
    sys.exit(main())
