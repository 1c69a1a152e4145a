"""run.py end to end on the CPU: it learns, stop + resume equals one run, torchrun/gloo, checkpoints, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, MACHINE, ROOT, interrupted, metrics, one_line, train

import run
from model.train import checkpoint, demo
from pipeline.bench.sweep import best_line
from pipeline.manifest import load_manifest
from pipeline.threads import dali_threads


@pytest.fixture(scope="module")
def one_run(demo_shards, tmp_path_factory):
    """Three uninterrupted epochs, with a ten-crop evaluation at the end."""
    workdir = tmp_path_factory.mktemp("run") / "whole"
    assert train(demo_shards, workdir, "--epochs", "3", "--ten-crop") == 0
    return workdir


@pytest.mark.slow
def test_training_learns(one_run):
    rows = metrics(one_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]
    assert rows[-1]["val_top1_err"] < 0.75  # 4 classes: chance is 75 %


@pytest.mark.slow
def test_each_epochs_row_holds_consistent_figures(one_run):
    for r in metrics(one_run):
        assert 0 <= r["val_top1_err"] <= 1 and 0 <= r["val_top5_err"] <= r["val_top1_err"]
        assert 96 / r["img_per_s"] <= r["epoch_s"] and 0 <= r["data_wait_frac"] < 1  # the epoch's images / its time
        assert r["samples_seen"] == 96 and r["steps_per_rank"] == [6] and r["step"] == 6 * r["epoch"]


@pytest.mark.slow
def test_summary_reports_the_runs_shape_and_its_last_epoch(one_run):
    rows, summary = metrics(one_run), json.loads((one_run / "summary.json").read_text())
    assert summary["num_classes"] == 4 and summary["world_size"] == 1 and summary["epochs"] == 3
    assert summary["steps_per_epoch"] == 6 and summary["samples_seen_per_epoch"] == 96
    assert summary["samples_seen_per_class"] == [24, 24, 24, 24] and summary["val_samples"] == 24
    assert summary["val_top1_err"] == rows[-1]["val_top1_err"] and 0 <= summary["val_top1_err_10crop"] <= 1
    assert summary["wall_s"] >= sum(r["epoch_s"] for r in rows)


@pytest.mark.slow
def test_workdir_holds_the_config_the_plot_and_the_last_checkpoints(one_run):
    assert json.loads((one_run / "config.json").read_text())["epochs"] == 3
    assert (one_run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in checkpoint.step_files(one_run / "checkpoints")] == [
        "step-000000018.pt",
        "step-000000012.pt",
        "step-000000006.pt",
    ]


@pytest.mark.slow
def test_eval_of_best_pt_reproduces_the_lowest_error(one_run):
    best = min(r["val_top1_err"] for r in metrics(one_run))
    out = subprocess.run(
        [sys.executable, "run.py", "--eval", str(one_run / "checkpoints" / "best.pt"), *MACHINE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["center"]["top1_err"] == pytest.approx(best)


@pytest.mark.slow
def test_plot_metrics_script(one_run, tmp_path):
    out = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(one_run / "metrics.jsonl"), "--out", str(tmp_path / "m.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_continues_to_where_one_run_ends(one_run, demo_shards, tmp_path, capsys):
    workdir = tmp_path / "preempted"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), *FAST, "--epochs", "3", "--ten-crop"]
    code, _, err = interrupted(argv, after="epoch 2/3 step")  # SIGTERM lands inside epoch 2
    saved = checkpoint.step_files(workdir / "checkpoints")[0]
    assert code == 128 + signal.SIGTERM
    ours = [line for line in err.splitlines() if not line.startswith("[/opt/dali")]  # DALI's own warnings
    assert ours == [
        (
            f"run.py: SIGTERM: stopped at epoch 2, step {int(saved.name[5:14])}; saved {saved}; run the same "
            f"command to continue from it"
        )
    ]
    assert 6 <= int(saved.name[5:14]) < 18 and [r["epoch"] for r in metrics(workdir)] == [1]
    # A newer checkpoint that is truncated (a disk fault) is reported, and the previous one is used.
    (saved.parent / "step-000000017.pt").write_bytes(saved.read_bytes()[:1000])
    capsys.readouterr()
    assert run.main(argv) == 0  # the same command
    out = capsys.readouterr()
    assert "step-000000017.pt: truncated" in out.err and f"falling back to {saved.name}" in out.err
    assert f"continuing from {saved}" in out.out
    timings = ("img_per_s", "data_wait_frac", "epoch_s", "wall_s")
    untimed = [[{k: v for k, v in r.items() if k not in timings} for r in metrics(w)] for w in (one_run, workdir)]
    assert untimed[0] == untimed[1]  # bit-exact: losses and errors are compared with ==
    a, b = (
        {k: v for k, v in json.loads((w / "summary.json").read_text()).items() if k not in timings}
        for w in (one_run, workdir)
    )
    assert a == b


@pytest.mark.slow
def test_max_steps_stops_and_the_same_command_with_more_steps_continues(demo_shards, tmp_path, capsys):
    workdir = tmp_path / "steps"
    assert train(demo_shards, workdir, "--epochs", "1", "--max-steps", "2") == 0
    assert "stopped at step 2 (--max-steps 2)" in capsys.readouterr().out
    assert train(demo_shards, workdir, "--epochs", "1", "--max-steps", "2") == 0
    assert "at step 2 already" in capsys.readouterr().out
    assert train(demo_shards, workdir, "--epochs", "1") == 0
    assert "continuing from" in capsys.readouterr().out and [r["step"] for r in metrics(workdir)] == [6]


@pytest.mark.slow
def test_non_finite_loss_stops_with_last_good_checkpoint(demo_shards, tmp_path, capsys):
    workdir = tmp_path / "nan"
    assert train(demo_shards, workdir, "--epochs", "1") == 0
    capsys.readouterr()
    assert train(demo_shards, workdir, "--epochs", "2", "--resume", "--lr", "1e6") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("loss is nan" in err or "loss is inf" in err)
    assert f"Last good checkpoint: {workdir / 'checkpoints' / 'step-000000006.pt'}" in err
    assert [p.name for p in checkpoint.step_files(workdir / "checkpoints")] == ["step-000000006.pt"]
    state = checkpoint.read(workdir / "checkpoints" / "step-000000006.pt")
    assert all(t.isfinite().all() for t in state["model"].values())


@pytest.mark.slow
def test_demo_reduced(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        demo.DEMO_DATA, "cpu", dict(classes=3, per_class=16, val_per_class=4, size_range=(72, 90), resize="short:72")
    )
    assert (
        run.main(
            ["--demo", "--device", "cpu", "--workdir", str(tmp_path / "demo"), "--epochs", "1", "--batch-size", "16"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "demo: 3 synthetic classes" in out and "AlexNet learned 3 synthetic classes from 48 images" in out
    assert "chance 67%" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["val_samples"] == 12


def test_inputs_are_mean_subtracted_only_unless_divide_std(demo_shards):
    """§2 by default, through run.py's own loader; --divide-std (and the demo preset) also divide by the std."""
    ctx = run.Context(rank=0, world=1, devices=(torch.device("cpu"),))
    spread = {}
    for extra in ([], ["--divide-std"]):
        cfg = run.parse(["--shards", str(demo_shards), *MACHINE, *extra])
        assert cfg.divide_std == bool(extra)
        with run.make_loader(cfg, ctx, load_manifest(cfg.shards), "val", "center", cfg.crop_size) as loader:
            spread[cfg.divide_std] = float(next(iter(loader))[0].float().std())
    assert spread[False] > 10 and spread[True] < 3  # 0-255 pixel units against units of one std
    assert run.parse(["--demo", "--device", "cpu"]).divide_std


def test_loader_settings_default_from_the_node_and_take_bench_io_sweeps_best(demo_shards, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = run.parse(["--shards", str(demo_shards)])
    assert (cfg.threads, cfg.hw_decoder_load, cfg.prefetch) == (dali_threads(cores, 1), 0.65, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # torchrun: more processes than cores on this node
    assert run.parse(["--shards", str(demo_shards)]).threads == 1
    # bench_io --sweep prints its best setting as run.py flags, to be pasted as they are.
    best = {"batch_size": 256, "threads": 12, "hw_decoder_load": 0.8, "prefetch": 3}
    flags = best_line(best).split(":", 1)[1].split()
    cfg = run.parse(["--shards", str(demo_shards), *flags])
    assert {k: getattr(cfg, k) for k in best} == best


def _one_line_exit_2(capsys, argv):
    assert run.main(argv) == 2
    return one_line(capsys.readouterr().err)


def test_bad_input_no_shards(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_exit_2(capsys, ["--shards", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w")])
    assert "run tools/shard_imagenet.py" in err and "manifest.json" in err
    assert not (tmp_path / "w").exists()


def test_bad_input_workdir_of_another_run(demo_shards, tmp_path, capsys):
    """A run stopped before its first checkpoint: the same settings start again, others are refused."""
    argv = ["--shards", str(demo_shards), "--workdir", str(tmp_path / "w"), *FAST]
    (tmp_path / "w").mkdir()
    other = json.dumps({**dataclasses.asdict(run.parse(argv)), "momentum": 0.5})
    (tmp_path / "w" / "config.json").write_text(other)
    err = _one_line_exit_2(capsys, argv)
    assert f"{tmp_path / 'w' / 'config.json'} was trained with --momentum 0.5" in err
    assert (tmp_path / "w" / "config.json").read_text() == other


def test_bad_input_resume_with_nothing(demo_shards, tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["--shards", str(demo_shards), "--workdir", str(tmp_path / "w"), *FAST, "--resume"])
    assert "no readable checkpoint" in err and "without --resume" in err
    assert list((tmp_path / "w").iterdir()) == []  # the lock released and its file gone: nothing else written


def test_bad_input_resume_with_other_settings(demo_shards, tmp_path, capsys):
    argv = ["--shards", str(demo_shards), "--workdir", str(tmp_path / "w"), *FAST]
    saved = {**dataclasses.asdict(run.parse(argv)), "momentum": 0.5}
    checkpoint.save(tmp_path / "w" / "checkpoints", {"config": saved, "world_size": 1}, step=3)
    for extra in (["--resume"], []):  # the same command and the explicit --resume alike
        assert "step-000000003.pt was trained with --momentum 0.5" in _one_line_exit_2(capsys, [*argv, *extra])


def test_bad_input_model_parallel_without_two_devices(demo_shards, tmp_path, capsys):
    err = _one_line_exit_2(
        capsys, ["--shards", str(demo_shards), "--workdir", str(tmp_path / "w"), "--device", "cpu", "--model-parallel"]
    )
    assert "--model-parallel needs two cpu devices" in err
    assert not (tmp_path / "w").exists()


def test_bad_input_crop_larger_than_the_smallest_image(demo_shards, tmp_path, capsys):
    small = tmp_path / "small"
    shutil.copytree(demo_shards, small)
    raw = json.loads((small / "manifest.json").read_text())
    raw["splits"]["train"]["min_side"] = 60  # as the sharder records it; the demo's resize side is 80
    (small / "manifest.json").write_text(json.dumps(raw))
    err = _one_line_exit_2(capsys, ["--shards", str(small), "--workdir", str(tmp_path / "w"), *FAST])
    assert err == (
        f"run.py: {small / 'manifest.json'}: the smallest 'train' image has a short side of 60, smaller "
        f"than crop_size 64; pass a smaller --crop-size, or re-shard with tools/shard_imagenet.py "
        f"--resize short:64"
    )
    assert not (tmp_path / "w").exists()


def test_bad_input_eval_of_a_missing_checkpoint(tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["--eval", str(tmp_path / "nope.pt")])
    assert "nope.pt: unreadable" in err and "WORKDIR/checkpoints" in err


@pytest.mark.parametrize(
    "flag",
    [
        ["--threads", "-1"],
        ["--prefetch", "0"],
        ["--hw-decoder-load", "1.5"],
        ["--batch-size", "0"],
        ["--lr", "-1"],
        ["--log-interval", "0"],
        ["--epochs", "0"],
        ["--keep", "0"],
        ["--checkpoint-minutes", "-1"],
        ["--warmup-epochs", "-1"],
        ["--crop-size", "32"],  # below the 63 pixels AlexNet's poolings leave one pixel of
        ["--warmup-epochs", "inf"],
        ["--lr", "nan"],
        ["--seed", "99999999999999999999999"],
        ["--seed", "-1"],
        ["--workdir", ""],
    ],
)
def test_bad_input_values_refused_before_anything_is_written(flag, demo_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--shards", str(demo_shards), "--workdir", str(tmp_path / "w"), *FAST, *flag])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"run.py: {flag[0]} ") and ": must be " in err
    assert not (tmp_path / "w").exists()


def test_bad_input_batch_larger_than_the_split(demo_shards, tmp_path, capsys):
    err = _one_line_exit_2(
        capsys, ["--shards", str(demo_shards), "--workdir", str(tmp_path / "w"), *FAST, "--batch-size", "97"]
    )
    assert "--batch-size 97 x 1 process(es) is more than the 96 train images" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_bad_input_unknown_flag_from_the_shell():
    out = subprocess.run(
        [sys.executable, "run.py", "--shards", "x", "--epochz", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["run.py: unrecognized arguments: --epochz 3 (see python run.py --help)"]


@pytest.mark.slow
def test_a_checkpoint_of_an_older_run_py_evaluates_and_refuses_resume_in_one_line(
    one_run, demo_shards, tmp_path, capsys
):
    """Before one DALI pipeline per run: `num_threads` for `threads`, no decoder settings, one loader position."""
    state = checkpoint.read(checkpoint.step_files(one_run / "checkpoints")[0])
    config = {k: v for k, v in state["config"].items() if k not in ("threads", "hw_decoder_load", "prefetch")}
    old = {**state, "config": {**config, "num_threads": 1}, "loader": {"epoch": 3, "step": 0, "seed": 0}}
    workdir = tmp_path / "old"
    path = checkpoint.save(workdir / "checkpoints", old, old["step"])
    (workdir / "config.json").write_text(json.dumps(old["config"]))
    assert run.main(["--eval", str(path), *MACHINE]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["center"]["samples"] == 24
    assert train(demo_shards, workdir, "--epochs", "4", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by an older run.py" in err and f"--eval {path}" in err


@pytest.mark.slow
def test_resume_on_shards_of_another_size_is_one_line(one_run, demo_shards, tmp_path, capsys):
    shards = Path(shutil.copytree(demo_shards, tmp_path / "fewer"))
    manifest = json.loads((shards / "manifest.json").read_text())
    dropped = manifest["splits"]["train"]["shards"].pop()
    manifest["splits"]["train"]["count"] -= dropped["count"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    workdir = Path(shutil.copytree(one_run, tmp_path / "run"))
    assert train(shards, workdir, "--epochs", "4", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained on other train shards (fingerprint" in err
