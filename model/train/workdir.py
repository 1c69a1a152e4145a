"""A run's workdir: one run at a time (an flock), what a restart continues from, and the data a checkpoint was
trained on."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK = "run.lock"


class WorkdirBusy(Exception):
    """Another live process holds the workdir; the message is one line naming it."""


class WorkdirLock:
    """An flock on WORKDIR/run.lock from acquire() to release(), or to the process's death (kill -9 leaves none)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self.fd = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirBusy(
                f"{self.path.parent}: in use by {holder} ({self.path}); wait for that run to end, "
                f"or pass another --workdir"
            ) from None
        os.ftruncate(fd, 0)  # who holds it, for the message a second run prints
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv)}\n".encode(),
            0,
        )
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def remove_temporaries(workdir: Path) -> list[Path]:
    """Remove what an interrupted atomic write left (.NAME.tmp*, never read); returns those files."""
    left = [p for folder in (workdir, workdir / "checkpoints") if folder.is_dir() for p in folder.glob(".*.tmp*")]
    for p in left:
        p.unlink(missing_ok=True)
    return left


def data_identity(manifest) -> dict:
    """The data a checkpoint is trained on: the class list (label i's wnid), and the train shards' fingerprint."""
    shards = [(s.tar.name, s.count, s.tar_sha256) for s in manifest.shards("train")]
    return {
        "classes": [c["wnid"] for c in manifest.classes],
        "train": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16],
    }


def other_classes(saved: list, classes: list) -> str | None:
    """How a checkpoint's class list differs from the shards' (None if it does not)."""
    if len(saved) != len(classes):
        return f"{len(saved)} classes, and these shards hold {len(classes)}"
    i = next((i for i, (a, b) in enumerate(zip(saved, classes)) if a != b), None)
    return None if i is None else f"another class list (label {i} was {saved[i]}, here {classes[i]})"


def other_data(saved: dict, here: dict) -> str | None:
    """How the data a checkpoint was trained on differs from these shards' (None if it does not)."""
    if saved == here:
        return None
    return (
        other_classes(saved["classes"], here["classes"])
        or f"other train shards (fingerprint {saved['train']}, these {here['train']})"
    )
