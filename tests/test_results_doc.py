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
