"""`crosswrite report`: loss and metric curves of runs (from their metrics.jsonl) as PNG files, and a summary table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from crosswrite_jax.errors import UserError
from crosswrite_jax.reporting import read_metrics

SKIPPED = {"step", "split", "tokens", "examples", "nonfinite_steps", "learning_rate", "grad_norm",
           "steps_per_second", "padded_tokens_per_second", "padding_fraction", "perplexity", "nll"}
LOWER_IS_BETTER = ("loss", "nll", "perplexity")


def curves(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(split, metric) -> [(step, value)] for every numeric metric, in step order (a resumed run's repeats: last)."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for record in records:
        if record["split"] == "summary":  # one per training invocation: sizes and wall time, not a curve
            continue
        for name, value in record.items():
            if name in SKIPPED or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(value):
                out.setdefault((record["split"], name), {})[int(record["step"])] = float(value)
    return {key: sorted(points.items()) for key, points in out.items()}


def summary(name: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A run's last step, final train loss, and best and final value of each validation / eval metric."""
    series = curves(records)
    row: dict[str, Any] = {"run": name, "steps": max((r["step"] for r in records), default=0)}
    if ("train", "loss") in series:
        row["train_loss"] = round(series[("train", "loss")][-1][1], 4)
    summaries = [r for r in records if r["split"] == "summary"]
    if summaries:
        row["trainable_percent"] = summaries[-1].get("trainable_percent")
        row["train_seconds"] = round(sum(r.get("seconds", 0.0) for r in summaries), 1)
    for (split, metric), points in sorted(series.items()):
        if split == "train" or metric == "tokens_per_second":
            continue
        values = [v for _, v in points]
        best = min(values) if metric in LOWER_IS_BETTER else max(values)
        row[f"{split}_{metric}"] = round(values[-1], 4)
        if len(values) > 1:
            row[f"{split}_{metric}_best"] = round(best, 4)
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with every column any row has."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """One PNG per (split, metric) with a line per run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    series = {name: curves(records) for name, records in runs.items()}
    keys = sorted({key for s in series.values() for key in s})
    written = []
    for split, metric in keys:
        figure, axes = plt.subplots(figsize=(6, 4))
        for name, s in series.items():
            points = s.get((split, metric))
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, marker="o" if len(points) < 12 else None, label=name)
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        axes.set_title(f"{split} {metric}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out / f"{split}_{metric}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def report(workdirs: Sequence[str | Path], out: str | Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Summary rows and PNG curves of the runs (each named by its directory)."""
    runs = {}
    for workdir in workdirs:
        records = read_metrics(workdir)
        if not records:
            raise UserError(f"'{workdir}' has no metrics.jsonl records; pass run directories written by "
                            f"`crosswrite train`")
        runs[Path(workdir).name] = records
    rows = [summary(name, records) for name, records in runs.items()]
    return rows, plot(runs, Path(out))
