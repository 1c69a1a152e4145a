"""A run on a cluster: torchrun's restarts and SIGTERM, two runs in one workdir, other data, a full disk, a shard
truncated under a run; each as a user meets it, with real processes and files."""

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import FAST, ROOT, STOPPING_RUN, interrupted, metrics, signalled, start_torchrun, stopped, train

import run
from model.train import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMINGS = ("img_per_s", "data_wait_frac", "epoch_s", "wall_s")


def untimed(workdir) -> list:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in metrics(workdir)]


def torchrun(argv, after: str, act, *flags):
    """torchrun ARGV; `act(torchrun's process)` as rank 0 prints its first line containing `after` (stopped there
    till act's signals are in): (status, stdout, stderr)."""
    program = [str(STOPPING_RUN), after] if after else ["run.py"]
    proc = start_torchrun(*flags, *program, *argv)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if after and after in line:
            stopped((first := rank0(proc)).pid)
            act(proc)
            deadline = time.monotonic() + 60
            while not signalled(first.pid):  # act's signal, or torchrun's forward of it, not yet in
                assert time.monotonic() < deadline, "rank 0 was sent no signal"
                time.sleep(0.01)
            with contextlib.suppress(psutil.NoSuchProcess):
                first.resume()
            after = None
    out, err = proc.communicate(timeout=600)
    return proc.returncode, "".join(lines) + out, err


def rank0(proc) -> psutil.Process:
    """torchrun's worker with RANK=0."""
    return next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "0")


@pytest.fixture(scope="module")
def one_epoch(demo_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "one"
    assert train(demo_shards, workdir, "--epochs", "1") == 0
    return workdir


@pytest.fixture(scope="module")
def two_ranks(demo_shards, tmp_path_factory):
    """Two uninterrupted epochs on two ranks: what every interrupted run below must end with."""
    workdir = tmp_path_factory.mktemp("ddp") / "whole"
    code, out, err = torchrun(
        ["--shards", str(demo_shards), "--workdir", str(workdir), "--epochs", "2", *FAST], "", None
    )
    assert code == 0, err[-3000:]
    assert out.count("epoch 2/2: train loss") == 1  # only rank 0 reports
    return workdir


@pytest.mark.slow
def test_torchrun_two_processes_gloo(two_ranks):
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["steps_per_epoch"] == 3 and summary["steps_per_rank"] == [3, 3]
    assert summary["samples_seen_per_rank"] == [48, 48] and summary["samples_seen_per_epoch"] == 96
    assert summary["samples_seen_per_class"] == [24, 24, 24, 24]  # each rank its own half: every image once
    assert summary["val_samples"] == 24


@pytest.mark.slow
def test_torchrun_restart_after_kill_9_continues_from_the_last_checkpoint(two_ranks, demo_shards, tmp_path):
    """kill -9 of rank 0 (the lock's holder) in epoch 2: --max-restarts 1 relaunches the same command, which goes on."""
    workdir = tmp_path / "killed"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), "--epochs", "2", *FAST]
    code, out, err = torchrun(argv, "step-000000003.pt", lambda p: rank0(p).kill(), "--max-restarts", "1")
    assert code == 0, err[-3000:]
    assert "Traceback" not in err  # rank 1, whose collective lost its peer, says so in one line
    [ours] = [line for line in err.splitlines() if "run.py:" in line]
    assert ours.endswith(
        "run.py: rank 1: another rank of this job ended without a word (killed, out of memory, or its machine "
        "lost; torchrun's report names it); the checkpoints written are intact: run the same command to continue"
    )
    assert f"continuing from {workdir / 'checkpoints' / 'step-000000003.pt'}: epoch 2, step 3" in out
    assert untimed(workdir) == untimed(two_ranks)


def summary(workdir) -> dict:
    return {k: v for k, v in json.loads((Path(workdir) / "summary.json").read_text()).items() if k not in TIMINGS}


@pytest.mark.slow
def test_torchrun_stopped_inside_an_epoch_continues_to_every_figure_of_one_run(two_ranks, demo_shards, tmp_path):
    """Each rank's sums of the epoch under way (loss, classes seen) are its own: a continued run reports what an
    uninterrupted one does, in metrics.jsonl and summary.json alike."""
    workdir = tmp_path / "stopped"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), "--epochs", "2", *FAST]
    for extra in (["--max-steps", "4"], []):  # step 4: inside epoch 2 (3 steps each)
        code, out, err = torchrun([*argv, *extra], "", None)
        assert code == 0, err[-3000:]
    assert f"continuing from {workdir / 'checkpoints' / 'step-000000004.pt'}: epoch 2, step 4" in out
    assert untimed(workdir) == untimed(two_ranks)
    assert summary(workdir) == summary(two_ranks)


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_once(tmp_path):
    code, _, err = torchrun(["--shards", str(tmp_path / "nothing"), "--workdir", str(tmp_path / "w")], "", None)
    assert code != 0
    ours = [line for line in err.splitlines() if line.startswith("run.py:")]
    assert len(ours) == 1 and "no such shard folder" in ours[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_the_same_command_continues(
    two_ranks, demo_shards, tmp_path
):
    workdir = tmp_path / "preempted"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), "--epochs", "2", *FAST]
    _, _, err = torchrun(argv, "epoch 1/2 step", lambda p: p.send_signal(signal.SIGTERM))
    saved = checkpoint.step_files(workdir / "checkpoints")[0]
    ours = [line for line in err.splitlines() if line.startswith("run.py:")]
    assert ours == [
        f"run.py: SIGTERM: stopped at epoch {1 + int(saved.name[5:14]) // 3}, step "
        f"{int(saved.name[5:14])}; saved {saved}; run the same command to continue from it"
    ]
    state = checkpoint.read(saved)
    assert [s["step"] for s in state["loader"]] == [state["step"] % 3] * 2  # both ranks stopped after the same step
    assert f'File "{ROOT / "run.py"}"' not in err  # no traceback from run.py's processes (torchrun prints its own)
    code, out, err = torchrun(argv, "", None)
    assert code == 0, err[-3000:]
    assert f"continuing from {saved}" in out
    assert untimed(workdir) == untimed(two_ranks)


@pytest.mark.slow
def test_a_second_run_in_a_busy_workdir_is_refused_and_ctrl_c_saves(demo_shards, tmp_path, capsys):
    workdir = tmp_path / "w"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), *FAST, "--epochs", "1"]
    second = {}

    def start_a_second(after):  # while the first run trains: a double submit, and a --resume beside it
        for extra in ([], ["--resume"]):
            second[tuple(extra)] = (run.main([*argv, *extra]), capsys.readouterr().err)

    proc = subprocess.Popen(  # stopped as it prints its first progress line: certainly mid-way while refused
        [sys.executable, str(STOPPING_RUN), "epoch 1/1 step", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if "epoch 1/1 step" in line:
            stopped(proc.pid)
            start_a_second(line)
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            proc.send_signal(signal.SIGCONT)
            break
    _, err = proc.communicate(timeout=300)
    for code, message in second.values():
        assert code == 2 and len(message.strip().splitlines()) == 1
        assert f"{workdir}: in use by pid {proc.pid}, started " in message and "another --workdir" in message
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err
    saved = checkpoint.step_files(workdir / "checkpoints")[0]
    assert err.strip().splitlines() == [
        f"run.py: SIGINT: stopped at epoch 1, step {int(saved.name[5:14])}; saved "
        f"{saved}; run the same command to continue from it"
    ]
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 1  # the second run wrote nothing


@pytest.mark.slow
def test_a_workdir_stopped_before_its_first_checkpoint_starts_again(demo_shards, tmp_path, capsys):
    """Killed before its first checkpoint, with an interrupted save's temporary left: the same command starts."""
    workdir = tmp_path / "w"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), *FAST, "--epochs", "1"]
    code, _, _ = interrupted(argv, after="config:", sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(run.parse(argv))))
    (workdir / "checkpoints" / ".step-000000003.pt.tmp").write_bytes(b"half a checkpoint")
    assert run.main([*argv, "--resume"]) == 2
    out = capsys.readouterr()
    assert "no readable checkpoint to continue; run without --resume" in out.err
    assert f"removed {workdir / 'checkpoints' / '.step-000000003.pt.tmp'}" in out.out
    assert run.main([*argv, "--max-steps", "1"]) == 0
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["step-000000001.pt"]


def _other_classes(demo_shards, tmp_path, change) -> Path:
    shards = Path(shutil.copytree(demo_shards, tmp_path / "other"))
    manifest = json.loads((shards / "manifest.json").read_text())
    change(manifest["classes"])
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards


def _rename_second(classes):  # a class folder renamed: it sorts last, so labels 1-3 now mean other classes
    classes.append({**classes.pop(1), "wnid": "n99999999"})


@pytest.mark.slow
def test_other_data_is_refused_by_a_continued_run_and_by_eval(one_epoch, demo_src, demo_shards, tmp_path, capsys):
    workdir = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    resharded = tmp_path / "resharded"  # the same images, other shards
    from tools.shard_imagenet import main as shard_main

    assert (
        shard_main(
            [
                "--src",
                str(demo_src),
                "--out",
                str(resharded),
                "--resize",
                "short:80",
                "--shard-size",
                "48",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    renamed = _other_classes(demo_shards, tmp_path, _rename_second)
    capsys.readouterr()
    for shards, what in (
        (resharded, "other train shards (fingerprint"),
        (renamed, "another class list (label 1 was n00000001, here n00000002)"),
    ):
        assert train(shards, workdir, "--epochs", "2") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err and f"--shards it was trained on ({demo_shards})" in err
    best = str(one_epoch / "checkpoints" / "best.pt")
    five = _other_classes(demo_shards, tmp_path / "five", lambda c: c.append({**c[0], "wnid": "n88888888"}))
    for shards, what in ((renamed, "another class list (label 1"), (five, "4 classes, and these shards hold 5")):
        assert run.main(["--eval", best, "--shards", str(shards), "--device", "cpu", "--threads", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err and "Traceback" not in err


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_the_last_checkpoint_stays(
    one_epoch, demo_shards, tmp_path, monkeypatch, capsys
):
    workdir = Path(shutil.copytree(one_epoch, tmp_path / "run"))
    real = os.fsync

    def full(fd):  # the disk fills while the epoch-2 checkpoint is written
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".step-000000012.pt.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert train(demo_shards, workdir, "--epochs", "2") == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"run.py: cannot write {workdir / 'checkpoints' / 'step-000000012.pt'} (No space left on device); "
        f"the checkpoints written before are intact: make room, then run the same command to continue"
    )
    assert checkpoint.load_latest(workdir / "checkpoints")[1].name == "step-000000006.pt"
    assert not list((workdir / "checkpoints").glob(".*"))


@pytest.mark.slow
def test_a_shard_truncated_during_the_run_is_named_before_the_next_epoch(demo_shards, tmp_path):
    shards = Path(shutil.copytree(demo_shards, tmp_path / "shards"))
    tar = shards / "train-000001.tar"
    # Another process truncates a shard while epoch 1 is evaluated (a re-shard or a copy over the same folder).
    driver = (
        f"import os, sys, run\nend = run.Trainer.end_epoch\n"
        f"def truncating(self, epoch):\n    os.truncate({str(tar)!r}, 1000)\n    return end(self, epoch)\n"
        f"run.Trainer.end_epoch = truncating\nsys.exit(run.main(sys.argv[1:]))\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            driver,
            "--shards",
            str(shards),
            "--workdir",
            str(tmp_path / "w"),
            *FAST,
            "--epochs",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    size = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][1]["tar_bytes"]
    assert (
        out.returncode == 2
        and "Traceback" not in out.stderr
        and out.stderr.strip().splitlines()[-1:]
        == [
            f"run.py: {tar}: 1000 bytes now, the manifest says {size} (changed during the run); "
            f"restore the shard folder, then run the same command to continue"
        ]
    )


@pytest.mark.slow
def test_a_val_shard_truncated_before_validation_keeps_the_epochs_training(one_epoch, demo_shards, tmp_path):
    """The epoch's checkpoint comes first, the line names the epoch and step trained; once the shard is back, the
    same command validates that epoch without training it again, and ends as one uninterrupted run."""
    shards = Path(shutil.copytree(demo_shards, tmp_path / "shards"))
    tar, kept = shards / "val-000000.tar", tmp_path / "val.tar"
    shutil.copy(tar, kept)
    driver = (
        f"import os, sys, run\nend = run.Trainer.end_epoch\n"
        f"def truncating(self, epoch):\n    os.truncate({str(tar)!r}, 1000)\n    return end(self, epoch)\n"
        f"run.Trainer.end_epoch = truncating\nsys.exit(run.main(sys.argv[1:]))\n"
    )
    argv = ["--shards", str(shards), "--workdir", str(tmp_path / "w"), *FAST, "--epochs", "1"]
    out = subprocess.run(
        [sys.executable, "-c", driver, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV
    )
    saved = tmp_path / "w" / "checkpoints" / "step-000000006.pt"
    size = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["shards"][0]["tar_bytes"]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"run.py: {tar}: 1000 bytes now, the manifest says {size} (changed during the run); restore the shard "
        f"folder, then run the same command to continue (validating epoch 1 at step 6; its training is saved in "
        f"{saved})"
    )
    shutil.copy(kept, tar)
    again = subprocess.run(
        [sys.executable, "run.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV
    )
    assert again.returncode == 0, again.stderr
    assert f"continuing from {saved}" in again.stdout and "epoch 1/1 step" not in again.stdout  # nothing retrained
    assert untimed(tmp_path / "w") == untimed(one_epoch)
