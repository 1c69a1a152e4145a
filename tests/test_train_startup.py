"""A signal while a run starts (loaders built, first batches prepared) ends it at once, in one line: nothing is
trained yet that a checkpoint would keep."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE = ["--batch-size", "16", "--crop-size", "64", "--threads", "1", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_ends_the_run_within_seconds_in_one_line(demo_shards, tmp_path, sig):
    workdir = tmp_path / "w"
    argv = ["--shards", str(demo_shards), "--workdir", str(workdir), *MACHINE, "--prefetch", "32"]
    proc = subprocess.Popen(
        [sys.executable, "-u", "run.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("config:"):  # settled and locked; now the loaders are built and start reading
            break
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    ours = [line for line in err.splitlines() if not line.startswith("[/opt/dali")]  # DALI's own warnings
    assert proc.returncode == 128 + sig and ours == [
        f"run.py: {sig.name} before the first step ended: stopped; run the same command to start"
    ], err
    assert took < 15, took  # not after the first step, nor after 32 batches were prepared
    assert not list(workdir.glob("checkpoints/*.pt"))
