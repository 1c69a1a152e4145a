"""The sharder as separate processes meet it: a second run on a live folder, kill -9 and a plain kill of the main
process, Ctrl-C in the terminal, a worker taken by the OOM killer. Each run under test stops itself (SIGSTOP) right
after writing its first progress record, so the test acts on a run that is certainly mid-way, however loaded the
machine; then no worker survives, and the rerun gives the bytes of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import STOPPING, tree

from pipeline.synthetic import make_dataset
from tools.shard_imagenet import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real sharder processes, signalled and rerun
ARGS = ["--resize", "short:40", "--shard-size", "16", "--seed", "3", "--workers", "2"]


def errors(err: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("sharding:")]


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["--src", str(pristine), "--out", str(out), *ARGS]) == 0
    return tree(out)


@pytest.fixture
def stopped_run(tmp_path):
    """stopped_run(src, out): a run in a session of its own (as a terminal's foreground job), stopped after its first
    progress record; returns the run and its workers. Whatever a failing test leaves running is killed afterwards."""
    started = []

    def start(src: Path, out: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
        script = tmp_path / "shard_imagenet_stopping.py"
        script.write_text(STOPPING)
        proc = subprocess.Popen(
            [sys.executable, str(script), "--src", str(src), "--out", str(out), *ARGS],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        main_process = psutil.Process(proc.pid)
        started.append(main_process)
        deadline = time.monotonic() + 300  # a hang guard, not a speed requirement
        while main_process.status() != psutil.STATUS_STOPPED:
            assert proc.poll() is None, f"the run ended before its stop: {proc.communicate()}"
            assert time.monotonic() < deadline, "the run never reached its stop"
            time.sleep(0.01)
        workers = main_process.children()
        started.extend(workers)
        assert len(workers) == 2
        return proc, workers

    yield start
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def survivors(procs: list[psutil.Process], patience: float = 60) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) once `patience` seconds have passed, or none sooner."""

    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + patience
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in procs if alive(p)]


def rerun(src: Path, out: Path) -> int:
    return main(["--src", str(src), "--out", str(out), *ARGS])


def test_kill_9_of_the_main_process_takes_the_workers_with_it_and_the_rerun_is_byte_identical(
    pristine, reference, tmp_path, stopped_run
):
    out = tmp_path / "out"
    proc, workers = stopped_run(pristine, out)
    proc.kill()  # the OOM killer's choice: the main process alone
    proc.wait()
    assert survivors(workers) == []  # before reading the pipes, which a surviving worker would hold open
    assert (out / ".lock").exists() and not (out / "manifest.json").exists()  # the lock file stays; its lock does not
    assert rerun(pristine, out) == 0
    assert tree(out) == reference


def test_sigterm_prints_one_line_exits_143_and_leaves_no_worker(pristine, reference, tmp_path, stopped_run):
    out = tmp_path / "out"
    proc, workers = stopped_run(pristine, out)
    proc.terminate()  # a plain kill, or a job scheduler's stop
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143
    assert errors(err) == ["terminated (SIGTERM); rerun the same command to resume"]
    assert survivors(workers) == []
    assert rerun(pristine, out) == 0
    assert tree(out) == reference


def test_ctrl_c_prints_one_line_not_a_traceback_per_worker_and_the_rerun_completes(
    pristine, reference, tmp_path, stopped_run
):
    out = tmp_path / "out"
    proc, workers = stopped_run(pristine, out)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the main process and every worker get SIGINT
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert errors(err) == ["interrupted; rerun the same command to resume"]
    assert survivors(workers) == []
    assert rerun(pristine, out) == 0
    assert tree(out) == reference


def test_a_worker_killed_by_the_oom_killer_stops_the_run_with_one_line_and_the_rerun_completes(
    pristine, reference, tmp_path, stopped_run
):
    out = tmp_path / "out"
    proc, workers = stopped_run(pristine, out)
    workers[0].kill()
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)  # a hang fails here
    assert proc.returncode == 1
    assert len(errors(err)) == 1 and "worker process was killed" in err and "rerun the same command" in err
    assert survivors(workers) == []
    assert not (out / "manifest.json").exists()
    assert rerun(pristine, out) == 0
    assert tree(out) == reference


def test_a_second_run_on_a_live_folder_is_refused_whatever_its_arguments(
    pristine, reference, tmp_path, capsys, stopped_run
):
    """The retried job and the other --src of the issue: both refused at once in one line naming the live run, and
    --verify says the folder is being written; the folder ends as the one run alone makes it."""
    out = tmp_path / "out"
    other = make_dataset(tmp_path / "other", classes=2, per_class=4, val_per_class=1, size_range=(40, 48), seed=5)
    proc, workers = stopped_run(pristine, out)
    try:
        holder = json.loads((out / ".lock").read_text())
        for src, extra in ((pristine, []), (other, ["--resize", "none"])):
            capsys.readouterr()
            assert main(["--src", str(src), "--out", str(out), *ARGS, *extra]) == 2
            (line,) = errors(capsys.readouterr().err)
            assert (
                (f"--out {out} is being written by another run (pid {proc.pid}, started {holder['started']}, command: ")
                in line
                and f"--src {pristine}" in line
                and "Traceback" not in line
            )
        assert main(["--verify", str(out)]) == 2
        (line,) = errors(capsys.readouterr().err)
        assert "being written" in line and f"pid {proc.pid}" in line
    finally:
        proc.kill()
        proc.wait()
    assert survivors(workers) == []
    assert rerun(pristine, out) == 0
    assert tree(out) == reference
