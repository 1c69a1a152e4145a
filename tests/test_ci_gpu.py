""".ci/gpu --rehearse: the GPU session's one prepared script, run on the CPU with tiny data so that it cannot rot
unseen: every phase, the same files, the summary last, a failing phase recorded and passed over, a bench cut off
part-way summarised from what it measured."""

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".ci" / "gpu"
FILES = {
    "bench.log",
    "bench.json",
    "bench.png",
    "trace.json.gz",
    "sweep.log",
    "sweep.json",
    "tests.log",
    "summary.txt",
}
PHASES = ("data", "bench", "sweep", "tests", "heavy")
pytestmark = pytest.mark.slow


def rehearse(out: Path, data: Path, *phases: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "GPU_DATA": str(data), **env}
    argv = ["bash", str(GPU), "--rehearse", *(["run", *phases] if phases else [])]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)


def running(pid: int) -> bool:
    """Alive and not a zombie (a container without an init may keep those)."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(done, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.5)


def phases(summary: str) -> dict[str, str]:
    rows = summary.split("phase    status", 1)[1].splitlines()[1:]
    return {r.split()[0]: r[9:31].strip() for r in rows if r[:8].strip() in PHASES}


def test_rehearsal_runs_every_phase_and_writes_the_files(tmp_path):
    out = tmp_path / "out"
    run = rehearse(out, tmp_path / "data")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 come back from a device call
    summary = (out / "summary.txt").read_text()
    assert run.stdout.endswith(summary)  # printed last, where the device tool's output tail keeps it
    assert phases(summary) == dict.fromkeys(PHASES, "ok")
    assert run.stdout.index("== bench") < run.stdout.index("== tests") < run.stdout.index("== heavy")
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["towers"]) == {"dense", "grouped"} and not bench["memory"]["after_sweep"]
    assert bench["loader"]["epoch_boundary"]["steps"] >= 2
    sweep = json.loads((out / "sweep.json").read_text())
    trials = sweep["sweep"]["trials"]
    assert {t["hw_decoder_load"] for t in trials} == {1.0, 0.65, 0.0} and {t["threads"] for t in trials} == {1, 2}
    assert all(t["loader_img_per_s"] > 0 and t["img_per_s"] > 0 for t in trials)
    assert "baseline" not in sweep  # measured once, by bench
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))  # compressed: it comes back whole
    assert {"data wait", "training step"} <= {e.get("name") for e in trace["traceEvents"]}
    for figure in (
        "model alone",
        "loader alone",
        "end to end",
        "vs like-for-like baseline",
        "epoch boundary",
        "peak memory",
        "sweep: hw_decoder_load 0.0",
        "CPU figures say nothing about a GPU",
    ):
        assert figure in summary
    pid = int((tmp_path / "data" / "pid").read_text())
    assert not running(pid)  # the background generator finished; nothing left running


def test_a_failing_phase_is_recorded_and_the_rest_still_run(tmp_path):
    """The data cannot be written (its folder would sit under a file): the data phase fails, bench and sweep are
    skipped for want of data, the tests still run, and the script exits 1 after the summary."""
    (tmp_path / "file").write_text("")
    run = rehearse(tmp_path / "out", tmp_path / "file" / "data", "data", "bench", "sweep", "tests")
    assert run.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert run.stdout.endswith(summary)
    status = phases(summary)
    assert status["data"].startswith("failed") and status["bench"] == status["sweep"] == "skipped: no data"
    assert status["tests"] == status["heavy"] == "ok"


def bench_processes(root: int) -> list[int]:
    """The bench_io processes among `root`'s descendants (what this test started, nothing else)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        children = Path(f"/proc/{pid}/task/{pid}/children")
        kids = [int(c) for c in children.read_text().split()] if children.exists() else []
        todo += kids
        for kid in kids:
            argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0") if Path(f"/proc/{kid}").exists() else []
            if argv[:1] and b"python" in argv[0] and b"tools/bench_io.py" in argv:  # not `timeout` above it
                found.append(kid)
    return found


def test_a_bench_killed_part_way_is_summarised_from_what_it_measured(tmp_path):
    """bench killed (SIGKILL: no chance to tidy up) once its first figures are in bench.json: the phase is recorded
    as failed, and the goal table is still printed from the figures measured, the rest 'not measured'."""
    out, data = tmp_path / "out", tmp_path / "data"
    env = {**os.environ, "OUT": str(out), "GPU_DATA": str(data)}
    script = subprocess.Popen(
        ["bash", str(GPU), "--rehearse", "run", "data", "bench"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )

    def measured() -> bool:
        path = out / "bench.json"
        return path.exists() and "loader" in json.loads(path.read_text())  # written atomically: whole or absent

    try:
        wait_until(lambda: measured() or script.poll() is not None, 300, "bench's first figure")
        (pid,) = bench_processes(script.pid)
        os.kill(pid, signal.SIGKILL)
        stdout, _ = script.communicate(timeout=120)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert stdout.endswith(summary) and phases(summary)["bench"] == "failed (exit 137)"
    assert "loader alone" in summary and "not measured (cut off)" in summary


def test_data_is_started_once_reused_when_done_and_restarted_when_its_generator_died(tmp_path):
    data = tmp_path / "data"

    def data_call() -> str:
        run = subprocess.run(
            ["bash", str(GPU), "--rehearse", "data"],
            capture_output=True,
            text=True,
            env={**os.environ, "GPU_DATA": str(data)},
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    def wait_done(pid: int) -> None:
        wait_until(lambda: not running(pid), 300, "the data generator")
        assert (data / "done").exists(), (data / "log").read_text()[-2000:]

    assert "started" in data_call()
    pid = int((data / "pid").read_text())
    again = data_call()  # the second staging call, while the first's generator runs (or just finished)
    assert "being generated" in again or "ready" in again
    assert int((data / "pid").read_text()) == pid
    wait_done(pid)
    assert "ready" in data_call()
    # A machine that went cold mid-way, or a killed generator: a dead pid and no done mark start it anew.
    (data / "done").unlink()
    assert "started" in data_call() and int((data / "pid").read_text()) != pid
    wait_done(int((data / "pid").read_text()))
    assert (data / "shards" / "manifest.json").exists()


def test_data_that_finished_between_the_two_looks_is_reused_not_generated_again(tmp_path):
    """The generator writes done, then ends: one seen without done, then seen dead, did both in between, and its data
    is reused, not wiped and generated anew (the moment made certain: reading its pid writes done)."""
    data, shim = tmp_path / "data", tmp_path / "bin"
    data.mkdir()
    shim.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    (data / "pid").write_text(f"{ended.pid}\n")
    (shim / "cat").write_text(f'#!/bin/sh\ntouch "{data}/done"\nexec {shutil.which("cat")} "$@"\n')
    (shim / "cat").chmod(0o755)
    env = {**os.environ, "GPU_DATA": str(data), "PATH": f"{shim}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(GPU), "--rehearse", "data"], capture_output=True, text=True, env=env, timeout=60)
    started = (data / "pid").read_text().strip()
    if started != str(ended.pid):  # started anew: stop that generator (setsid: its own group, once it has made it)
        with contextlib.suppress(ProcessLookupError):
            while os.getpgid(int(started)) != int(started):
                time.sleep(0.01)
            os.killpg(int(started), signal.SIGKILL)
    assert run.returncode == 0 and "data: ready" in run.stdout and started == str(ended.pid), run.stdout


def test_a_gpu_run_without_a_budget_is_refused_in_one_line(tmp_path):
    run = subprocess.run(
        ["bash", str(GPU), "run"], capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)}
    )
    assert run.returncode == 2 and "GPU_BUDGET_S" in run.stderr and len(run.stderr.splitlines()) == 1
