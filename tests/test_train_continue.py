"""Continuing a run: settings saved before a setting existed, the normalisation the weights were trained with, what
config.json holds and when it is written, folders kept absolute, and a workdir that cannot be one."""

import json
import os
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from helpers import MACHINE, train

import run
from model.train import checkpoint
from model.train.config import Config, UsageError, refuse_changes
from tools.shard_imagenet import main as shard_main

COSINE = ["--schedule", "cosine", "--batch-size", "32"]  # 3 steps per epoch


def test_which_settings_a_continued_run_may_change_is_declared_with_each_setting():
    resumable = {f.name for f in fields(Config) if f.metadata["resumable"]}
    assert {"lr", "epochs", "max_steps", "threads", "prefetch", "compile", "shards", "workdir"} <= resumable
    assert not {"momentum", "batch_size", "crop_size", "seed", "schedule"} & resumable
    base = Config(shards="/a", workdir="/w")
    refuse_changes(replace(base, lr=0.5, epochs=9, shards="/b", resume=True), base, Path("x"))
    with pytest.raises(UsageError) as e:
        refuse_changes(replace(base, momentum=0.5, seed=1), base, Path("x"))
    assert (
        str(e.value)
        == "x was trained with --seed 0, --momentum 0.9; pass the same settings to continue it, or a new --workdir"
    )


@pytest.mark.slow
def test_a_checkpoint_saved_before_a_setting_existed_continues(demo_shards, tmp_path, capsys):
    """Aged by hand: a setting added since is missing from its config (it takes its default), and one since removed
    is there (it is named once and left out)."""
    workdir = tmp_path / "w"
    assert train(demo_shards, workdir, "--epochs", "1", "--max-steps", "1") == 0
    path = checkpoint.step_files(workdir / "checkpoints")[0]
    state = checkpoint.read(path)
    aged = {**{k: v for k, v in state["config"].items() if k != "augment"}, "tower_split": "columns"}
    checkpoint.save(path.parent, {**state, "config": aged}, state["step"])
    (workdir / "config.json").write_text(json.dumps(aged))
    capsys.readouterr()
    assert train(demo_shards, workdir, "--epochs", "1", "--max-steps", "2") == 0
    out = capsys.readouterr()
    assert [line for line in out.err.splitlines() if "tower_split" in line] == [
        f"{path}: settings this run.py no longer has, ignored: tower_split"
    ]
    assert f"continuing from {path}: epoch 1, step 1" in out.out and "stopped at step 2" in out.out


@pytest.mark.slow
def test_eval_normalises_as_trained_not_with_the_evaluated_folders_statistics(
    demo_src, demo_shards, tmp_path, capsys, monkeypatch
):
    """The same val tar, in a folder sharded with --splits val alone (whose manifest has the val images' own
    statistics), gives the network the same inputs, and so the same scores, as from the training folder."""
    alone = tmp_path / "val-alone"
    argv = ["--src", str(demo_src), "--out", str(alone), "--resize", "short:80", "--shard-size", "32"]
    assert shard_main([*argv, "--workers", "1", "--splits", "val"]) == 0
    assert (alone / "val-000000.tar").read_bytes() == (demo_shards / "val-000000.tar").read_bytes()
    stats = [json.loads((d / "manifest.json").read_text())["stats"]["rgb_mean"] for d in (demo_shards, alone)]
    assert stats[0] != stats[1]
    workdir = tmp_path / "w"
    assert train(demo_shards, workdir, "--epochs", "1", "--max-steps", "2") == 0
    inputs, build = [], run.build

    def seeing(*args):  # the network as --eval builds it, noting each batch it is given
        model, raw = build(*args)
        raw.register_forward_pre_hook(lambda m, x: inputs[-1].append(x[0].double().sum(dim=(1, 2, 3))))
        return model, raw

    monkeypatch.setattr(run, "build", seeing)
    scores = []
    for shards in (demo_shards, alone):
        capsys.readouterr()
        inputs.append([])
        saved = checkpoint.step_files(workdir / "checkpoints")[0]
        assert run.main(["--eval", str(saved), "--shards", str(shards), *MACHINE]) == 0
        scores.append(json.loads(capsys.readouterr().out.splitlines()[-1])["center"])
    assert len(inputs[0]) == len(inputs[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*inputs)) and scores[0] == scores[1]


@pytest.fixture(scope="module")
def finished(demo_shards, tmp_path_factory):
    """A run of two epochs under the cosine schedule, to its end."""
    workdir = tmp_path_factory.mktemp("run") / "finished"
    assert train(demo_shards, workdir, *COSINE, "--epochs", "2") == 0
    return workdir


@pytest.mark.slow
def test_config_json_holds_the_settings_that_trained_and_serves_as_config(finished, demo_shards, tmp_path, capsys):
    saved = json.loads((finished / "config.json").read_text())
    assert not {"resume", "eval", "demo", "config"} & set(saved)  # one invocation's switches
    assert saved["epochs"] == 2 and saved["workdir"] == str(finished) and saved["shards"] == str(demo_shards)
    capsys.readouterr()
    other = tmp_path / "other"
    assert run.main(["--config", str(finished / "config.json"), "--workdir", str(other), "--max-steps", "1"]) == 0
    assert "stopped at step 1" in capsys.readouterr().out


@pytest.mark.slow
def test_a_finished_run_continued_with_fewer_epochs_writes_and_trains_nothing(finished, demo_shards, tmp_path, capsys):
    workdir = Path(shutil.copytree(finished, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train(demo_shards, workdir, *COSINE, "--epochs", "1", "--resume") == 0
    out = capsys.readouterr().out
    assert "at step 6 already (epoch 2); pass a larger --epochs" in out and "continuing" not in out
    assert {p.name: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_more_epochs_under_cosine_say_the_schedule_is_recomputed(finished, demo_shards, tmp_path, capsys):
    workdir = Path(shutil.copytree(finished, tmp_path / "run"))
    capsys.readouterr()
    assert train(demo_shards, workdir, *COSINE, "--epochs", "3", "--max-steps", "7") == 0
    out = capsys.readouterr().out
    assert "--epochs 3 (was 2): the cosine schedule is recomputed over 3 epochs" in out
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 3


def test_relative_folders_are_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = run.parse(["--shards", "shards", "--workdir", "runs/a"])
    assert (cfg.shards, cfg.workdir) == (str(tmp_path / "shards"), str(tmp_path / "runs" / "a"))


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_a_workdir_that_cannot_be_a_folder_is_one_line(kind, demo_shards, tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    workdir = tmp_path / "f" if kind == "file" else tmp_path / "f" / "w"
    assert train(demo_shards, workdir, "--epochs", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[/opt/dali")]
    what = "is a file" if kind == "file" else "cannot be written (Not a directory)"
    assert err == [f"run.py: --workdir {workdir} {what}; pass a folder you can write to"]
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "a file"


@pytest.mark.parametrize("text", ["", "{half", "[1, 2]"])
def test_a_damaged_config_json_is_one_line(text, demo_shards, tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(text)
    assert train(demo_shards, tmp_path / "w", "--epochs", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[/opt/dali")]
    assert len(err) == 1 and err[0].startswith(f"run.py: {tmp_path / 'w' / 'config.json'}: damaged (")
    assert err[0].endswith("remove it to start the run again, or pass another --workdir")
    assert (tmp_path / "w" / "config.json").read_text() == text
