"""A run's workdir: one run at a time (an flock), what a restart continues from, and the data a checkpoint was
trained on."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

from pipeline.lock import FolderLock

LOCK = "run.lock"


def workdir_lock(workdir: Path) -> FolderLock:
    """WORKDIR/run.lock, taken by rank 0 for the run's life: a second run in the same folder is refused (Busy)."""
    path = Path(workdir) / LOCK
    return FolderLock(
        path,
        lambda holder: f"{workdir}: in use by {holder} ({path}); wait for that run to end, or pass another --workdir",
    )


def write_error(e: OSError) -> str:
    """A failed write during the run, in one line: the file, the cause, and the fix."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return (
        f"run.py: cannot write {e.filename} ({e.strerror}); the checkpoints written before are intact: "
        f"{'make room' if full else 'fix that'}, then run the same command to continue"
    )


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
