"""Where the sharder writes: a local (or shared) folder or an s3:// bucket, behind one small interface for its records,
locks and shards, so that the run, its ranks and their reruns read the same whichever it is."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline import lock
from pipeline.atomic import atomic_write
from pipeline.store import Location, StoreError
from pipeline.writer import bucket

PROGRESS = ".progress"  # per-shard records of a run in progress, so a rerun after any stop skips finished shards
ARGS = f"{PROGRESS}/args.json"  # the plan's arguments and --src's fingerprint, which every rank must share
MERGE = ".lock-merge"  # held while the manifest is merged from the records, so two ranks finishing at once take turns


class UsageError(Exception):
    """Bad arguments or an environment the run cannot work in (unwritable --out, full disk): one line, exit 2."""


def rank_locks(world: int) -> str:
    """The start of the lock names of a world's ranks: every rank must be given the same world size."""
    return f"{lock.LOCK}-of-{world}-rank-"


def lock_name(rank: int, world: int) -> str:
    """A run without ranks holds .lock; each rank its own, so ranks write one --out together."""
    return lock.LOCK if world == 1 else f"{rank_locks(world)}{rank}"


def open_output(out: str | os.PathLike, own_lock: str) -> Folder | Remote:
    """--out as a folder or a bucket; a URL never becomes a local folder (s3:// is the only scheme taken)."""
    text = os.fspath(out)
    try:
        b = bucket.parse_url(text)
    except StoreError as e:
        raise UsageError(f"--out {e}") from None
    return Remote(b, own_lock) if b else Folder(Path(text), own_lock)


def stamps(folder: Path, shard: dict) -> dict:
    """Size and modification time of a shard's files as written: a rerun trusts them while these still hold, without
    reading the bytes again (--verify reads them all)."""
    return {n: [(st := os.stat(folder / n)).st_size, st.st_mtime_ns] for n in (shard["tar"], shard["index"])}


class Folder:
    def __init__(self, path: Path, own_lock: str):
        self.path, self.url, self.own_lock = path, str(path), own_lock
        self.staging, self.target = path, None

    def check(self) -> None:
        """Fail before the (long) scan of --src if --out cannot be created or written."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file; pick a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.path).close()
        except OSError as e:
            raise UsageError(f"--out {self.path}: {e.strerror}; pick a folder you can write to") from None

    def lock(self, name: str):
        return lock.hold(self.path, name)

    def writer(self, name: str) -> str | None:
        return lock.writer(self.path, name)

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def read(self, name: str) -> bytes | None:
        path = self.path / name
        return path.read_bytes() if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / name, data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` unless it exists (a link is atomic and exclusive); whether this call wrote it."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        atomic_write(tmp, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def delete(self, *names: str) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def intact(self, record: dict) -> bool:
        try:
            return stamps(self.path, record["shard"]) == record.get("stored")
        except FileNotFoundError:
            return False

    def clear(self, stems: list[str]) -> None:
        """Remove what a crash inside an atomic write left of these shards (other ranks' are not ours to touch)."""
        for stem in stems:
            self.delete(f".{stem}.tar.tmp", f".{stem}.idx.tmp", f"{PROGRESS}/.{stem}.json.tmp")

    def finish(self) -> None:
        """After the manifest: the records and any debris go; the folder holds the shards and the manifest."""
        shutil.rmtree(self.path / PROGRESS, ignore_errors=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


class Remote:
    def __init__(self, b: Location, own_lock: str):
        self.bucket, self.url, self.own_lock = b, b.url, own_lock
        self.staging, self.target, self.lease = None, b, None

    def check(self) -> None:
        try:
            bucket.check_bucket(self.bucket)
        except StoreError as e:
            raise UsageError(str(e)) from None

    @contextmanager
    def lock(self, name: str):
        with bucket.hold(self.bucket, name) as lease:
            if name == self.own_lock:
                self.lease = lease
            yield

    def writer(self, name: str) -> str | None:
        return bucket.writer(self.bucket, name)

    def entries(self) -> list[str]:
        return sorted({n.split("/", 1)[0] for n in bucket.names(self.bucket)})

    def read(self, name: str) -> bytes | None:
        return bucket.get(self.bucket, name)

    def write(self, name: str, data: bytes) -> None:
        if self.lease is not None and self.lease.lost:  # a record or manifest now could mix two runs' output
            raise StoreError(
                f"{self.url}/{self.own_lock}: another run took this run's lock over (it went {bucket.LEASE:.0f} s "
                f"without renewing it: stopped, or cut off); this run stops here"
            )
        bucket.put(self.bucket, name, data)

    def create(self, name: str, data: bytes) -> bool:
        return bucket.put(self.bucket, name, data, if_none_match=True) is not None

    def delete(self, *names: str) -> None:
        bucket.delete(self.bucket, *names)

    def intact(self, record: dict) -> bool:
        s, sizes = record["shard"], record.get("stored") or {}
        return all(
            name in sizes and bucket.stored(self.bucket, name, sizes[name][0], digest)
            for name, digest in ((s["tar"], s["tar_sha256"]), (s["index"], s["index_sha256"]))
        )

    def clear(self, stems: list[str]) -> None:
        """Shards are staged on this machine and uploaded whole: the bucket holds no partial object to clear."""
        self.staging = bucket.staging(self.bucket, self.own_lock)

    def finish(self) -> None:
        self.delete(*bucket.names(self.bucket, PROGRESS + "/"))
