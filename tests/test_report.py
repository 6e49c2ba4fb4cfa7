"""`crosswrite report`: curves from metrics.jsonl as PNG files and a summary table."""

import json

from crosswrite_jax.cli import main
from crosswrite_jax.report import curves, summary


def _run(folder, losses, accuracies):
    folder.mkdir(parents=True)
    with (folder / "metrics.jsonl").open("w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step * 10, "split": "train", "loss": loss, "tokens": 5}) + "\n")
        for step, accuracy in enumerate(accuracies, 1):
            f.write(json.dumps({"step": step * 20, "split": "val", "accuracy": accuracy, "loss": 1.0 / step}) + "\n")
    return folder


def test_report_draws_one_png_per_metric_and_summarizes_best_and_final(tmp_path, capsys):
    a = _run(tmp_path / "a", [3.0, 2.0, 1.5, 1.2], [70.0, 80.0])
    b = _run(tmp_path / "b", [3.1, 2.5, 2.2, 2.0], [60.0, 90.0, 85.0])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["train_loss.png", "val_accuracy.png", "val_loss.png"]
    assert all((tmp_path / "png" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert record["runs"] == 2
    assert "| b | 60 | 2.0 | 85.0 | 90.0 |" in out  # final 85, best 90


def test_a_resumed_run_keeps_the_last_record_of_a_step():
    records = [{"step": 10, "split": "train", "loss": 2.0}, {"step": 10, "split": "train", "loss": 1.0},
               {"step": 20, "split": "train", "loss": 0.5}]
    assert curves(records)[("train", "loss")] == [(10, 1.0), (20, 0.5)]
    assert summary("r", records)["train_loss"] == 0.5


def test_report_of_a_folder_without_metrics_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
