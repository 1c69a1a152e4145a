"""One run per folder: an exclusive flock on a file in it, held for the run's whole life and released by the kernel
however the process ends (kill -9 leaves no stale lock). The file names the holder for whoever is refused. The sharder
holds --out/.lock, a training run WORKDIR/run.lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lock"


class Busy(Exception):
    """Another live run holds the folder; the message is one line naming it."""


def describe(fd: int) -> str:
    """The holder as it wrote itself into the lock file: pid (and host, if another), start time and command."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0))
        host = holder.get("host", socket.gethostname())
        where = "" if host == socket.gethostname() else f" on {host}"
        return f"pid {holder['pid']}{where}, started {holder['started']}, command: {holder['command']}"
    except (ValueError, KeyError, TypeError, AttributeError):  # locked, and not yet written into: or an older file
        return "a run that is just starting"


class FolderLock:
    """An flock on `path` from acquire() to release() (or the process's death); `refusal(holder)` is the Busy line."""

    def __init__(self, path: Path, refusal: Callable[[str], str] | None = None):
        self.path, self.fd = Path(path), None
        self.refusal = refusal or (lambda holder: f"{self.path.parent}: in use by {holder} ({self.path})")

    def acquire(self, wait: Callable[[str], None] | None = None) -> None:
        """Take the lock, or raise Busy naming its holder; with `wait`, tell it the holder and wait for the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe(fd)
                if wait is None:
                    os.close(fd)
                    raise Busy(self.refusal(holder)) from None
                wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)  # the last holder removed the file between our open and our lock: lock the one there now
        self.fd = fd
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(sys.orig_argv),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a run that opened it meanwhile sees it go, retries
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


@contextmanager
def hold(out: Path, name: str = LOCK):
    """Hold the shard folder `out`'s lock (the file `name`) for the block, or raise Busy naming the live run."""
    lock = FolderLock(
        out / name,
        lambda holder: (
            f"--out {out} is being written by another run ({holder}); wait for it to end or stop it, then rerun"
        ),
    )
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def writer(out: Path, name: str = LOCK) -> str | None:
    """The live run holding `out`'s lock (the file `name`), described, or None."""
    try:
        fd = os.open(out / name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return describe(fd)
    finally:
        os.close(fd)
