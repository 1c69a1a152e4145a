"""One writer per shard folder: an exclusive flock on --out/.lock, held for the run's whole life and released by the
kernel however the process ends (kill -9 leaves no stale lock). The file names the holder for whoever is refused."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lock"


class Busy(Exception):
    """Another live run holds the folder."""


def describe(fd: int) -> str:
    """The holder as it wrote itself into the lock file: pid, start time and command."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0))
        return f"pid {holder['pid']}, started {holder['started']}, command: {holder['command']}"
    except (ValueError, KeyError, TypeError):  # the holder has locked the file and not yet written itself into it
        return "a run that is just starting"


@contextmanager
def hold(out: Path, name: str = LOCK):
    """Hold `out`'s lock (the file `name`) for the block, or raise Busy naming the live run. The file is removed on
    release."""
    path = out / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(fd)
            os.close(fd)
            raise Busy(
                f"--out {out} is being written by another run ({holder}); wait for it to end or stop it, then rerun"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the last holder removed the file between our open and our lock: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": shlex.join(sys.orig_argv),
                }
            ).encode(),
        )
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a run that opened it meanwhile sees the inode go, retries
        os.close(fd)


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
