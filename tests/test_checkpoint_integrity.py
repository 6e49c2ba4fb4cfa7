"""Checksum manifests: corrupt or truncated steps are reported, skipped on resume, and refused when asked for."""

import json
import logging
import shutil

import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from crosswrite_jax import checkpoint, integrity, sharding
from crosswrite_jax.errors import UserError
from crosswrite_jax.train import train
from crosswrite_jax.trainer import Trainer

ASYNC = dict(checkpoint__async_save=True)  # saves at 5 and 10 (checkpoint.every=5), max_to_keep=2


# ---------------------------------------------------------------- manifests on plain files (no JAX)

def _fake_step(path):
    (path / "params" / "d").mkdir(parents=True)
    (path / "params" / "d" / "abc").write_bytes(bytes(range(256)) * 4)
    (path / "_CHECKPOINT_METADATA").write_text("{}")
    return path


def test_manifest_lists_every_file_and_catches_each_kind_of_damage(tmp_path):
    step = _fake_step(tmp_path / "7")
    assert integrity.verify_step(step) == []  # no manifest yet: fine unless strict
    assert integrity.verify_step(step, strict=True) == ["no manifest"]
    manifest = integrity.write_manifest(step)
    assert manifest == step / integrity.MANIFEST
    files = json.loads(manifest.read_text())["files"]
    assert list(files) == ["_CHECKPOINT_METADATA", "params/d/abc"]
    assert files["params/d/abc"]["size"] == 1024
    assert not list(step.glob(".manifest*"))  # the temporary file was renamed into place
    assert integrity.verify_step(step, strict=True) == []

    (step / "extra.txt").write_text("not in the manifest")
    assert integrity.verify_step(step) == []

    data = step / "params" / "d" / "abc"
    original = data.read_bytes()
    data.write_bytes(original[:1000])
    assert integrity.verify_step(step) == ["params/d/abc: truncated (1000 of 1024 bytes)"]
    data.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    assert integrity.verify_step(step) == ["params/d/abc: checksum mismatch"]
    data.unlink()
    assert integrity.verify_step(step) == ["params/d/abc: missing"]
    manifest.write_text("{")
    assert [p.split(" (")[0] for p in integrity.verify_step(step)] == [f"{integrity.MANIFEST}: unreadable"]


def test_verify_report_takes_a_workdir_a_checkpoints_dir_or_one_step(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for n in (5, 10):
        integrity.write_manifest(_fake_step(checkpoints / str(n)))
    (checkpoints / "15.orbax-checkpoint-tmp").mkdir()
    ok, report = integrity.verify_report(tmp_path / "run")
    assert ok
    assert report.splitlines() == [
        "step 5: ok", "step 10: ok",
        "15.orbax-checkpoint-tmp: unfinished save (not a checkpoint; removed when training resumes)"]

    (checkpoints / "10" / "_CHECKPOINT_METADATA").write_text("{x")
    ok, report = integrity.verify_report(checkpoints)
    assert not ok
    assert "step 10: CORRUPT: _CHECKPOINT_METADATA: checksum mismatch" in report.splitlines()
    assert integrity.verify_report(checkpoints / "5") == (True, "step 5: ok")
    assert integrity.verify_directory(checkpoints) == {5: [], 10: ["_CHECKPOINT_METADATA: checksum mismatch"]}

    (checkpoints / "5" / integrity.MANIFEST).unlink()
    assert integrity.verify_report(checkpoints / "5") == (True, "step 5: ok (no manifest: not checked)")
    assert integrity.verify_report(checkpoints / "5", strict=True) == (False, "step 5: CORRUPT: no manifest")

    with pytest.raises(UserError, match="does not exist"):
        integrity.verify_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoints in"):
        integrity.verify_report(tmp_path / "empty")


# ---------------------------------------------------------------- through the real training loop

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run stopped at step 10 with async saves at 5 and 10, every step with its manifest."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    train(tiny_config(**ASYNC), workdir, stop_at=10)
    manager = checkpoint.open_manager(workdir / "checkpoints")
    assert integrity.has_manifest(workdir / "checkpoints" / "5")  # written by the save of step 10
    checkpoint.finalize(manager)  # what train() does after its last save
    manager.close()
    assert integrity.verify_directory(workdir / "checkpoints", strict=True) == {5: [], 10: []}
    return workdir


@pytest.fixture
def run(saved_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    return workdir


def _largest_file(directory, under=""):
    files = [p for p in directory.rglob("*") if p.is_file() and under in p.relative_to(directory).as_posix()
             and p.name != integrity.MANIFEST]
    return max(files, key=lambda p: p.stat().st_size)


def _train_steps(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def _resume_falls_back_to_step_5(workdir, bad_file, problem, caplog):
    checkpoints = workdir / "checkpoints"
    caplog.set_level(logging.INFO, logger="crosswrite")
    train(tiny_config(**ASYNC, train__steps=15), workdir)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 10" in m and f"{bad_file}: {problem}" in m for m in warnings), warnings
    assert any("resumed from step 5" in r.getMessage() for r in caplog.records)
    assert _train_steps(workdir) == list(range(1, 11)) + list(range(6, 16))  # redid 6..10, not reused
    # The damaged step was set aside (still damaged), and step 10 was saved anew.
    aside = [p for p in checkpoints.iterdir() if integrity.SET_ASIDE_DIR.match(p.name)]
    assert [p.name.split(".")[0] for p in aside] == ["10"]
    assert any(bad_file in p for p in integrity.verify_step(aside[0]))
    assert sorted(integrity.step_dirs(checkpoints)) == [10, 15]
    assert integrity.verify_step(checkpoints / "10", strict=True) == []
    assert integrity.verify_step(checkpoints / "15") == []


def test_flipped_byte_is_reported_and_resume_falls_back_to_the_step_before(run, caplog):
    step_10 = run / "checkpoints" / "10"
    data = _largest_file(step_10, under="params/d/")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    name = data.relative_to(step_10).as_posix()

    ok, report = integrity.verify_report(run)
    assert not ok
    assert report.splitlines() == ["step 5: ok", f"step 10: CORRUPT: {name}: checksum mismatch"]
    _resume_falls_back_to_step_5(run, name, "checksum mismatch", caplog)


def test_truncated_file_is_reported_and_resume_falls_back_to_the_step_before(run, caplog):
    step_10 = run / "checkpoints" / "10"
    data = _largest_file(step_10, under="opt_state/")
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    name = data.relative_to(step_10).as_posix()

    ok, report = integrity.verify_report(step_10)
    assert not ok and report == f"step 10: CORRUPT: {name}: truncated ({size // 2} of {size} bytes)"
    _resume_falls_back_to_step_5(run, name, "truncated", caplog)


def test_explicit_corrupt_step_is_a_user_error_and_read_only_restores_fall_back_in_place(run, caplog):
    step_10 = run / "checkpoints" / "10"
    data = _largest_file(step_10, under="params/")
    raw = data.read_bytes()
    data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x80]))
    name = data.relative_to(step_10).as_posix()
    trainer = Trainer.build(tiny_config(), sharding.make_mesh((-1, 1, 1)))
    abstract = trainer.layout.abstract_with_shardings().params
    manager = checkpoint.open_manager(run / "checkpoints", read_only=True)
    with pytest.raises(UserError, match=f"checkpoint step 10 in .* is corrupt: {name}: "):
        checkpoint.restore_state(manager, trainer.layout, step=10)
    with pytest.raises(UserError, match=f"{name}: "):
        checkpoint.restore_params(manager, abstract, step=10)

    caplog.set_level(logging.WARNING, logger="crosswrite")
    _, metadata, step = checkpoint.restore_params(manager, abstract)  # newest intact: 5
    assert step == 5 and metadata["step"] == 5
    assert any("step 10" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    assert (step_10 / name).exists() and manager.all_steps() == [5, 10]  # read-only: nothing moved
    manager.close()


def test_eval_states_the_step_it_scored_and_that_it_fell_back(run, capsys):
    from crosswrite_jax.cli import main

    data = _largest_file(run / "checkpoints" / "10", under="params/")
    data.write_bytes(data.read_bytes()[:-1])
    assert main(["eval", "--workdir", str(run)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (scores["step"], scores["fell_back"], scores["newest_step"]) == (5, True, 10)
    assert main(["eval", "--workdir", str(run), "--step", "10"]) == 2  # an explicit step never falls back
    assert "checkpoint step 10" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(run), "--step", "5"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (scores["step"], scores["fell_back"]) == (5, False) and "newest_step" not in scores


def test_no_intact_step_is_a_user_error_and_moves_nothing(run):
    checkpoints = run / "checkpoints"
    for n in ("5", "10"):
        data = _largest_file(checkpoints / n, under="params/")
        data.write_bytes(b"")
    trainer = Trainer.build(tiny_config(), sharding.make_mesh((-1, 1, 1)))
    manager = checkpoint.open_manager(checkpoints)
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step 10 is corrupt: .*step 5 is corrupt: "):
        checkpoint.restore_state(manager, trainer.layout)
    manager.close()
    assert sorted(integrity.step_dirs(checkpoints)) == [5, 10]


def test_unfinished_saves_are_removed_when_training_resumes_and_committed_steps_are_untouched(run):
    checkpoints = run / "checkpoints"
    leftovers = [checkpoints / "15.orbax-checkpoint-tmp", checkpoints / "20.orbax-checkpoint-tmp-1712345678"]
    for tmp in leftovers:
        (tmp / "params.orbax-checkpoint-tmp").mkdir(parents=True)
        (tmp / "params.orbax-checkpoint-tmp" / "_METADATA").write_text("partial")
    keep = [checkpoints / "notes.orbax-checkpoint-tmp", checkpoints / "notes.txt"]
    keep[0].mkdir()
    keep[1].write_text("mine")

    # Orbax 0.12.8 leaves them unless CheckpointManagerOptions(cleanup_tmp_directories=True).
    plain = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(),
                                  item_names=(checkpoint.PARAMS, checkpoint.OPT_STATE, checkpoint.METADATA))
    assert plain.all_steps() == [5, 10]
    plain.close()
    assert all(tmp.exists() for tmp in leftovers)
    checkpoint.open_manager(checkpoints, read_only=True).close()  # evaluation never deletes
    assert all(tmp.exists() for tmp in leftovers)

    checkpoint.open_manager(checkpoints).close()
    assert not any(tmp.exists() for tmp in leftovers)
    assert all(p.exists() for p in keep)
    assert integrity.verify_directory(checkpoints, strict=True) == {5: [], 10: []}

    for tmp in leftovers:
        tmp.mkdir()
    train(tiny_config(**ASYNC, train__steps=15), run)
    assert not any(tmp.exists() for tmp in leftovers)
    assert sorted(integrity.step_dirs(checkpoints)) == [10, 15]
    assert _train_steps(run)[-1] == 15


def test_checkpoint_verify_command_reports_the_corrupt_file(tmp_path, capsys):
    from crosswrite_jax import cli
    from crosswrite_jax.train import train

    workdir = tmp_path / "run"
    train(tiny_config(train__steps=4, checkpoint__every=2, checkpoint__max_to_keep=3), workdir)
    assert cli.main(["checkpoint", "verify", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "step 2: ok" in out and "step 4: ok" in out and "not checked" not in out  # every step has a manifest
    victim = max((p for p in (workdir / "checkpoints" / "4" / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cli.main(["checkpoint", "verify", str(workdir)]) == 1
    out = capsys.readouterr().out
    assert "step 4: CORRUPT" in out and victim.name in out and "step 2: ok" in out
