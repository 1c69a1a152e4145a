"""One run per workdir: an flock on WORKDIR/run.lock for the run's whole life, released by the OS when it dies."""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

LOCK = "run.lock"


class WorkdirBusy(Exception):
    """Another live process holds the workdir; the message is one line naming it."""


class WorkdirLock:
    """Held from acquire() to release() (or the process's death: a kill -9 leaves no stale lock)."""

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
            raise WorkdirBusy(f"{self.path.parent}: in use by {holder} ({self.path}); wait for that run to end, "
                              f"or pass another --workdir") from None
        os.ftruncate(fd, 0)  # who holds it, for the message a second run prints
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
