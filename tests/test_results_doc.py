"""docs/RESULTS.md and README's table are what scripts/make_results.py renders from docs/results/summary.json,
and every current row's command still builds the config its run recorded: no figure or default drifts."""

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from crosswrite_jax import config as config_lib

FIELDS = ("section", "run", "metric", "mean", "std", "seeds", "labeled_examples", "wall_seconds", "command")


def _script():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _summary():
    return json.loads((ROOT / "docs" / "results" / "summary.json").read_text())


def test_results_md_and_readme_are_rendered_from_the_summary_rows():
    make_results = _script()
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    assert text == make_results.render_stored(_summary())
    block = make_results.readme_block(text)
    assert block.count("\n|") >= 3  # a header, a rule and at least one measured row
    assert block in (ROOT / "README.md").read_text()


def test_every_row_has_the_machine_readable_fields():
    rows = _summary()["rows"]
    assert rows
    for row in rows:
        missing = [f for f in FIELDS if f not in row]
        assert not missing, (row["run"], missing)
        assert row["mean"] == row["scores"][row["metric"]]
        assert (row["std"] is None) == (row.get("seeds_found", 1) < 2), row["run"]


def test_every_png_results_md_shows_exists():
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    for name in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (ROOT / "docs" / name).is_file(), name


def _flat(config) -> dict:
    return config_lib._flatten(json.loads(json.dumps(config_lib.to_dict(config))))


DISPLAY_ONLY = ("train.progress_bar",)  # keys that change what a run prints, never what it computes


def _installed(path):
    """A path inside an installed package, from its site-packages on: the same package in another venv."""
    return path.split("site-packages/", 1)[1] if isinstance(path, str) and "site-packages/" in path else path


def _current_rows():
    return [r for r in _summary()["rows"] if not r.get("legacy") and not r.get("code_commit")]


def test_rows_of_older_code_name_a_commit_of_this_repository():
    for row in _summary()["rows"]:
        if row.get("code_commit"):
            assert row["command"].startswith(f"git checkout {row['code_commit']} -- crosswrite_jax && ")
            done = subprocess.run(["git", "cat-file", "-e", f"{row['code_commit']}^{{commit}}"], cwd=ROOT)
            assert done.returncode == 0, row["code_commit"]


@pytest.mark.parametrize("row", _current_rows(), ids=lambda r: f"{r['run']}-beam{r.get('beam_size', 1)}")
def test_current_rows_commands_rebuild_the_config_their_run_recorded(row):
    """A default that changes after a row was measured must be stated in its command, or this fails."""
    make_results = _script()
    assert row["config"], f"{row['run']}: no saved config"
    built = _flat(make_results.command_config(row["command"], row["seeds"][0]))
    saved = _flat(config_lib.from_dict(row["config"]))  # keys added since the run take their defaults
    for key in DISPLAY_ONLY:
        saved.pop(key), built.pop(key)
    if not built["data.labels"]:  # labels found in the training split are recorded by training
        saved.pop("data.labels"), built.pop("data.labels")
    for flat in (built, saved):
        flat["train.init_from"] = _installed(flat["train.init_from"])
    differing = {k: (built.get(k), saved.get(k)) for k in set(built) | set(saved) if built.get(k) != saved.get(k)}
    assert not differing, f"{row['run']}: command builds (built, saved) {differing}"


def test_rows_over_seeds_are_means_with_sample_deviation_and_before_values(tmp_path):
    make_results = _script()
    e = make_results.Experiment("s", "run", "what", "crosswrite train --config configs/quickstart.py "
                                "--workdir runs/run_s{seed} --config.train.seed={seed}", "", ("bleu",),
                                seeds=(0, 1, 2), labeled_examples=290)
    for seed, (before, best) in enumerate([(1.0, 10.0), (2.0, 12.0), (3.0, 14.0)]):
        folder = tmp_path / f"run_s{seed}"
        folder.mkdir()
        records = [{"step": 0, "split": "val", "bleu": before}, {"step": 50, "split": "val", "bleu": best},
                   {"step": 100, "split": "val", "bleu": best - 5},
                   {"step": 100, "split": "summary", "seconds": 60.0 * (seed + 1)}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        config = dataclasses.replace(config_lib.Config(), train=config_lib.TrainConfig(seed=seed))
        config_lib.save_json(config, folder / "config.json")
    row = make_results.measure(e, tmp_path)
    assert (row["mean"], row["std"], row["seeds_found"]) == (12.0, 2.0, 3)
    assert row["before"] == {"bleu": 2.0} and row["wall_seconds"] == 120.0 and row["labeled_examples"] == 290
    assert "bleu 12.00 ± 2.00 (3 seeds)" in make_results.render([row], [], None, {})


def test_a_one_seed_side_by_side_states_its_seeds_and_no_spread_and_none_is_left_out():
    make_results = _script()
    sst2 = {"benchmark": "sst2_vs_pytorch", "metric": "accuracy", "steps": 432, "learning_rate": 1e-4, "seeds": 1,
            "packing": False, "ours_examples_per_step": 32, "pytorch_examples_per_step": 32, "ours_accuracy": [88.1],
            "ours_seconds": [600.0], "pytorch_accuracy": [87.6], "pytorch_seconds": [900.0], "ratio": 1.5}
    shown = make_results.render([], [], {"sst2_vs_pytorch": sst2}, {})
    assert "benchmarks/sst2_vs_pytorch.py --seeds 1 | tail -1" in shown and "1 seed a side" in shown
    assert "| crosswrite_jax | 88.10 | 10m 00s | 88.10 in 10m 00s |" in shown and "**1.50x**" in shown
    assert "batches of 32 padded to length buckets" in shown
    assert "Side by side" not in make_results.render([], [], None, {})


def test_side_by_side_sections_give_each_benchmarks_means_over_seeds():
    make_results = _script()
    ner = {"benchmark": "ner_vs_pytorch", "metric": "f1", "steps": 877, "learning_rate": 1e-4, "seeds": 3,
           "packing": True, "ours_examples_per_step": 31.5, "pytorch_examples_per_step": 32,
           "ours_f1": [88.0, 89.0, 90.0], "ours_seconds": [500.0, 600.0, 700.0],
           "pytorch_f1": [89.0, 89.0, 89.0], "pytorch_seconds": [900.0, 900.0, 900.0], "ratio": 1.5}
    shown = make_results.render([], [], {"ner_vs_pytorch": ner}, {})
    assert "PyTorch: CoNLL-2003 NER" in shown and "PyTorch: SST-2" not in shown
    assert "| crosswrite_jax | 89.00 ± 1.00 | 10m 00s ± 100 s | 88.00 in 8m 20s, 89.00 in 10m 00s, 90.00 in 11m 40s |" \
        in shown
    assert "31.5 a step on average" in shown and "**1.50x**" in shown


def test_a_learning_curve_table_puts_each_mean_under_its_label_count():
    make_results = _script()
    row = {"section": "S", "metric": "accuracy", "std": None}
    rows = [dict(row, start="scratch", labeled_examples=1000, mean=61.0, std=2.5),
            dict(row, start="own MLM", labeled_examples=250, mean=70.0),
            dict(row, start="own MLM", labeled_examples=1000, mean=80.125, std=0.5),
            dict(row, start="", labeled_examples=1000, mean=1.0)]  # not a curve point
    lines = make_results.curve_table(rows)
    assert lines[2] == "| start | 250 | 1,000 |"
    assert lines[4:6] == ["| scratch |  | 61.00 ± 2.50 |", "| own MLM | 70.00 | 80.12 ± 0.50 |"]
    assert make_results.curve_table([rows[-1]]) == []


def test_pending_commands_list_each_unfinished_seed_once_seed_0_first(tmp_path):
    make_results = _script()
    done = tmp_path / "mt_scratch_n2900_s0"
    done.mkdir()
    (done / "metrics.jsonl").write_text('{"step": 600, "split": "summary", "seconds": 1.0}\n'
                                        '{"step": 600, "split": "test_2016_flickr", "bleu": 8.0}\n')
    started = tmp_path / "mt_pretrained_n2900_s1"
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"step": 100, "split": "train", "loss": 1.0}\n')  # killed: to rerun
    stopped = tmp_path / "mt_pretrained_n2900_s2"  # stopped by SIGTERM: a summary, but never scored
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text('{"step": 260, "split": "summary", "seconds": 1.0}\n')
    commands = make_results.pending_commands(tmp_path, r"^mt_(pretrained|scratch)_n2900$")
    workdirs = [c.split("--workdir ")[1].split()[0] for c in commands]
    assert workdirs == [f"runs/mt_{side}_n2900_s{seed}" for seed in (0, 1, 2) for side in ("pretrained", "scratch")
                        if (side, seed) != ("scratch", 0)]
    assert all("{seed}" not in c for c in commands)


def test_before_and_after_table_lists_every_labeled_recipe_with_its_rows():
    make_results = _script()
    recipes = make_results.labeled_recipes()
    assert "configs/finetune_sst2_mlm.py" in recipes and "configs/finetune_ner_conll.py" in recipes
    assert not any("mt" in r or "scitldr" in r for r in recipes)  # generation recipes have their own rows
    row = {"what": "own MLM, 1,000 labels", "metric": "accuracy", "mean": 70.25, "before": {"accuracy": 50.0},
           "command": "crosswrite train --config configs/finetune_sst2_mlm.py --workdir runs/x"}
    lines = make_results.before_after_table([row], ["configs/finetune_sst2_mlm.py", "configs/finetune_sst2.py"])
    assert "| `configs/finetune_sst2_mlm.py` | own MLM, 1,000 labels | accuracy | 50.00 | 70.25 | +20.25 |" in lines
    assert "| `configs/finetune_sst2.py` | not run with a step-0 validation yet | | | | |" in lines
