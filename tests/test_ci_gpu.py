""".ci/gpu --rehearse: the GPU session's one prepared script, run on the CPU with tiny data so that it cannot rot
unseen: every phase, the same files, the summary last, a failing phase recorded and passed over."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"tests.log", "bench.log", "bench.json", "bench.png", "sweep.log", "sweep.json", "resume.log", "summary.txt"}
pytestmark = pytest.mark.slow


def rehearse(out: Path, data: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "GPU_DATA": str(data), **env}
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu"), "--rehearse"], capture_output=True, text=True, env=env, timeout=900
    )


def running(pid: int) -> bool:
    """Alive and not a zombie (a container without an init may keep those)."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def phases(summary: str) -> dict[str, str]:
    rows = summary.split("phase    status", 1)[1].splitlines()[1:]
    return {
        r.split()[0]: r[9:31].strip() for r in rows if r[:8].strip() in ("tests", "data", "bench", "sweep", "resume")
    }


def test_rehearsal_runs_every_phase_and_writes_the_files(tmp_path):
    out = tmp_path / "out"
    run = rehearse(out, tmp_path / "data")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 come back from a device call
    summary = (out / "summary.txt").read_text()
    assert run.stdout.endswith(summary)  # printed last, where the device tool's output tail keeps it
    assert phases(summary) == dict.fromkeys(["tests", "data", "bench", "sweep", "resume"], "ok")
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["towers"]) == {"dense", "grouped"} and not bench["memory"]["after_sweep"]
    assert bench["loader"]["epoch_boundary"]["steps"] >= 2
    trials = json.loads((out / "sweep.json").read_text())["sweep"]["trials"]
    assert {t["hw_decoder_load"] for t in trials} == {1.0, 0.65, 0.0} and {t["threads"] for t in trials} == {1, 2}
    assert all(t["loader_img_per_s"] > 0 and t["img_per_s"] > 0 for t in trials)
    for figure in (
        "model alone",
        "loader alone",
        "end to end",
        "vs DataLoader + Pillow",
        "epoch boundary",
        "peak memory",
        "sweep: hw_decoder_load 0.0",
    ):
        assert figure in summary
    pid = int((tmp_path / "data" / "pid").read_text())
    assert not running(pid)  # the background generator finished; nothing left running


def test_a_failing_phase_is_recorded_and_the_rest_still_run(tmp_path):
    """The data cannot be written (its folder would sit under a file): the data phase fails, bench and sweep are
    skipped for want of data, the last phase still runs, and the script exits 1 after the summary."""
    (tmp_path / "file").write_text("")
    run = rehearse(tmp_path / "out", tmp_path / "file" / "data")
    assert run.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert run.stdout.endswith(summary)
    status = phases(summary)
    assert status["data"].startswith("failed") and status["bench"] == status["sweep"] == "skipped: no data"
    assert status["resume"] == "ok"


def test_data_is_started_once_reused_when_done_and_restarted_when_its_generator_died(tmp_path):
    data = tmp_path / "data"

    def data_call() -> str:
        run = subprocess.run(
            ["bash", str(ROOT / ".ci" / "gpu"), "--rehearse", "data"],
            capture_output=True,
            text=True,
            env={**os.environ, "GPU_DATA": str(data)},
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    def wait_done(pid: int) -> None:
        while running(pid):
            time.sleep(0.5)
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
