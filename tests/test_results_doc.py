"""README's results table is the one scripts/make_results.py wrote into docs/RESULTS.md: no figure drifts."""

import importlib.util
import sys

from conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_readme_results_table_matches_results_md():
    make_results = _script()
    block = make_results.readme_block((ROOT / "docs" / "RESULTS.md").read_text())
    assert block.count("\n|") >= 3  # a header, a rule and at least one measured row
    assert block in (ROOT / "README.md").read_text()


def test_every_png_results_md_shows_exists():
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    for name in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert (ROOT / "docs" / name).is_file(), name


def test_side_by_side_section_shows_both_sides_or_is_listed_as_not_run():
    make_results = _script()
    result = {"steps": 432, "learning_rate": 1e-4, "ours_accuracy": 88.1, "pytorch_accuracy": 87.6,
              "ours_seconds": 600.0, "pytorch_seconds": 900.0, "ratio": 1.5}
    shown = make_results.render([], [], [], result)
    assert "| crosswrite_jax | 88.10 | 10m 00s |" in shown and "**1.50x**" in shown
    assert "## Not run yet" not in shown
    absent = make_results.render([], [], [], None)
    assert "## Not run yet" in absent and "sst2_vs_pytorch.py" in absent.split("## Not run yet")[1]
