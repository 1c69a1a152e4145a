"""Helpers the test modules share (a plain module; the fixtures are in conftest.py): comparing trees, decoding JPEGs,
checking one-line errors, running run.py as the training tests do, and starting moto_server."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

import run

ROOT = Path(__file__).resolve().parents[1]
# 96 train images / batch 16 = 6 steps per epoch; 64x64 is the smallest crop AlexNet's three poolings take.
MACHINE = ["--batch-size", "16", "--crop-size", "64", "--threads", "1", "--log-interval", "2", "--device", "cpu"]
# He init at this lr diverges on undivided 0-255 pixels (the §2 default), as the demo would: hence --divide-std.
FAST = MACHINE + ["--lr", "0.02", "--lr-scaling", "none", "--warmup-epochs", "0.5", "--init", "kaiming", "--divide-std"]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path, with its bytes: two trees compare equal when byte-identical."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def decode(jpeg: bytes) -> np.ndarray:
    """A JPEG's RGB pixels as float64 (Pillow), for comparisons with a tolerance."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)


def one_line(err: str, *says: str, progress: str | None = None) -> str:
    """The one line of a program's error output `err` (lines starting with `progress` aside, carriage returns as line
    ends), having checked that it is one line, no traceback, and says all of `says`."""
    lines = [
        line
        for line in err.replace("\r", "\n").splitlines()
        if line.strip() and not (progress and line.startswith(progress))
    ]
    assert len(lines) == 1 and "Traceback" not in err and all(s in lines[0] for s in says), err
    return lines[0]


def train(shards, workdir, *extra) -> int:
    """run.py in this process on the CPU with FAST's settings: its exit status."""
    return run.main(["--shards", str(shards), "--workdir", str(workdir), *FAST, *extra])


def metrics(workdir) -> list[dict]:
    """WORKDIR/metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# run.py, stopped (SIGSTOP) as it prints a given line: `python STOPPING_RUN TEXT RUN_PY_ARGS...`.
STOPPING_RUN = ROOT / "tests" / "stopping_run.py"


def stopped(pid: int) -> None:
    """Wait for process `pid` to stop itself (SIGSTOP)."""
    proc, deadline = psutil.Process(pid), time.monotonic() + 300  # a hang guard, not a speed requirement
    while (status := proc.status()) != psutil.STATUS_STOPPED:
        assert status != psutil.STATUS_ZOMBIE and time.monotonic() < deadline, f"pid {pid} ended before its stop"
        time.sleep(0.01)


def signalled(pid: int) -> bool:
    """Whether process `pid` holds a signal not yet handled (it is stopped, say), or has ended."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except FileNotFoundError:
        return True
    return status["State"].split()[0] in "ZX" or int(status["SigPnd"], 16) | int(status["ShdPnd"], 16) != 0


def interrupted(argv, after: str, sig=signal.SIGTERM):
    """`python run.py ARGV`, sent `sig` as it prints its first line containing `after` (stopped there till the signal
    is in): (exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, str(STOPPING_RUN), after, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if after in line:
            stopped(proc.pid)
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(*args: str, ranks: int = 2) -> subprocess.Popen:
    """torchrun ARGS on `ranks` CPU processes in the checkout, its output piped (text)."""
    # A static rendezvous: with --standalone (c10d), torch 2.13's restarted workers hang or cannot connect.
    flags = ["--nnodes", "1", "--master-port", str(free_port()), "--nproc-per-node", str(ranks)]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *flags, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def start_moto(**env) -> tuple[subprocess.Popen, str]:
    """moto_server (a real S3 API) on 127.0.0.1 at a free port, with `env` added: (its process, its endpoint URL)."""
    port = free_port()
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.05)


def objects(url: str) -> dict[str, bytes]:
    """Every object under an s3:// prefix, by name relative to it, with its bytes: compares equal to tree() of the
    same files."""
    import boto3

    bucket, prefix = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3")
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for o in page.get("Contents", [])
    ]
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in sorted(keys)}


# The real sharder, but its main process stops itself (SIGSTOP) right after its first progress record: certainly
# mid-way (its workers carry on).
STOPPING = """
import os, signal, sys
import pipeline.writer.build as build
from tools.shard_imagenet import main
real = build.save_progress
def save_progress(*args):
    real(*args)
    os.kill(os.getpid(), signal.SIGSTOP)
    build.save_progress = real
build.save_progress = save_progress
sys.exit(main(sys.argv[1:]))
"""
