"""Config files, strict overrides and the saved resolved config."""

import pytest
from conftest import QUICKSTART, ROOT

from crosswrite_jax import config as config_lib
from crosswrite_jax.config import Config
from crosswrite_jax.errors import UserError


def test_misspelled_override_names_the_nearest_key():
    with pytest.raises(UserError, match=r"'optimizer.learnig_rate'.*did you mean 'optimizer.learning_rate'"):
        config_lib.override(Config(), {"optimizer.learnig_rate": "3e-4"})
    with pytest.raises(UserError, match=r"did you mean 'train.steps'"):
        config_lib.override(Config(), {"train.step": "3"})


def test_wrong_type_and_bad_choice_name_the_key():
    with pytest.raises(UserError, match=r"'train.steps' wants int, got 'many'"):
        config_lib.override(Config(), {"train.steps": "many"})
    with pytest.raises(UserError, match=r"'mesh.rules' is 'zero3'; choose one of"):
        config_lib.override(Config(), {"mesh.rules": "zero3"})
    with pytest.raises(UserError, match=r"'train.dropout_rng' is 'threefry'; choose one of .*threefry4x32"):
        config_lib.override(Config(), {"train.dropout_rng": "threefry"})
    with pytest.raises(UserError, match=r"'train.batch_size' must be positive"):
        config_lib.override(Config(), {"train.batch_size": 0})
    with pytest.raises(UserError, match="unknown config key 'model'"):
        config_lib.override(Config(), {"model": "big"})


def test_overrides_parse_command_line_strings_into_field_types():
    args = ["--config.optimizer.learning_rate=3e-4", "--config.mesh.shape=2,2,2", "--config.optimizer.freeze",
            "encoder/.*", "--config.train.progress_bar=false"]
    config = config_lib.override(Config(), config_lib.parse_overrides(args))
    assert config.optimizer.learning_rate == 3e-4
    assert config.mesh.shape == (2, 2, 2)
    assert config.optimizer.freeze == ("encoder/.*",)
    assert config.train.progress_bar is False
    with pytest.raises(UserError, match="unrecognized argument '--steps=3'"):
        config_lib.parse_overrides(["--steps=3"])


def test_config_files_load_and_broken_ones_name_the_file(tmp_path):
    config = config_lib.load(QUICKSTART)
    assert config.name == "quickstart" and config.train.steps > 0
    assert "crosswrite quickstart" in QUICKSTART.read_text()  # the recipe carries its own command
    missing = tmp_path / "nope.py"
    with pytest.raises(UserError, match="nope.py' not found"):
        config_lib.load(missing)
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return 3\n")
    with pytest.raises(UserError, match=r"broken.py: get_config\(\) returned int"):
        config_lib.load(broken)
    typo = tmp_path / "typo.py"
    typo.write_text("from crosswrite_jax.config import Config, TrainConfig\n"
                    "def get_config():\n    return Config(train=TrainConfig(steps='ten'))\n")
    with pytest.raises(UserError, match=r"typo.py: config key 'train.steps' wants int"):
        config_lib.load(typo)


def test_saved_config_round_trips(tmp_path):
    config = config_lib.override(config_lib.load(QUICKSTART), {"mesh.shape": "2,2,2", "optimizer.freeze": "a/.*,b"})
    config_lib.save_json(config, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == config


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.py")
                                          if not p.stem.endswith("_common")))
def test_every_recipe_loads_and_its_docstring_carries_its_command(recipe):
    import ast

    path = ROOT / "configs" / recipe
    config = config_lib.load(path)
    assert config.name
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert f"--config configs/{recipe}" in docstring.replace("\\\n", " ").replace("  ", " "), docstring
