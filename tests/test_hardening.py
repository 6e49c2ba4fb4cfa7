"""Files the CLI reads fail by name: a torn metrics.jsonl, a truncated safetensors file, a run's config.json."""

import json
import logging

import numpy as np
import pytest
from conftest import tiny_config

from crosswrite_jax import config as config_lib
from crosswrite_jax.errors import UserError
from crosswrite_jax.models import hf
from crosswrite_jax.reporting import MetricsWriter, read_metrics


def _records(n):
    return "".join(json.dumps({"step": i, "split": "train", "loss": 1.0 / (i + 1)}) + "\n" for i in range(n))


def test_a_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(_records(3) + '{"step": 3, "split": "tra')
    with caplog.at_level(logging.WARNING, logger="crosswrite"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert "metrics.jsonl:4" in caplog.text


def test_a_bad_line_inside_metrics_is_an_error_naming_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_records(2) + "not json\n" + _records(1))
    with pytest.raises(UserError, match=r"metrics.jsonl:3: not a metrics record"):
        read_metrics(tmp_path)


def test_a_resumed_writer_drops_the_torn_tail_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_records(2) + '{"step": 2, "spl')
    writer = MetricsWriter(tmp_path)
    writer.write(2, "train", {"loss": 0.5})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model.safetensors: not a readable safetensors file") as error:
        hf.read_checkpoint(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not a readable JSON config"):
        hf.read_checkpoint(tmp_path)


def test_a_runs_saved_config_json_is_accepted_as_a_config(tmp_path):
    config = tiny_config(train__steps=7)
    config_lib.save_json(config, tmp_path / "config.json")
    assert config_lib.load(tmp_path / "config.json") == config
    (tmp_path / "broken.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="broken.json: holds list, not a JSON object"):
        config_lib.load(tmp_path / "broken.json")


# --- the CLI's safety net -----------------------------------------------------------------------------------


def test_an_unwritable_workdir_is_one_line_naming_the_path(tmp_path, capsys):
    from conftest import QUICKSTART

    from crosswrite_jax.cli import main

    (tmp_path / "a_file").write_text("not a folder")
    workdir = tmp_path / "a_file" / "run"
    assert main(["train", "--config", str(QUICKSTART), "--workdir", str(workdir), "--config.train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosswrite: error: ") and "a_file" in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_an_unexpected_exception_is_one_line_pointing_at_debug(monkeypatch, capsys):
    from crosswrite_jax import cli

    def broken(args, overrides):
        raise RuntimeError("something\ninside broke")

    monkeypatch.setattr(cli, "run_keys", broken)
    assert cli.main(["keys"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("crosswrite: internal error: RuntimeError: something inside broke; rerun with --debug for the "
                   "traceback")
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "keys"])
