"""The sharder's side of a shard folder in an S3 bucket (AWS, or MinIO, Ceph, R2 through AWS_ENDPOINT_URL), on
pipeline/store.py's client and one-line errors: uploads checked against their sha256, conditional writes, and a lock
object made by one (If-None-Match), renewed while its run lives and taken over only from a holder that is certainly
dead: gone from this machine, or not renewed for a whole lease."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path

import botocore.exceptions as bx
import psutil

from pipeline import store
from pipeline.lock import Busy
from pipeline.store import CONFLICT, MISSING, Location, StoreError, error_code

# Seconds a lock object stays valid after its holder last renewed it (4 times per lease). Its age is measured on the
# store's clock alone (the Date of a response minus the object's Last-Modified), so machines' clocks need not agree.
LEASE = 120.0


def parse_url(text: str) -> Location | None:
    """s3://bucket/prefix as a Location, None for a local path; StoreError (one line) for any other URL."""
    if not store.is_url(text):
        return None
    where = store.parse_url(text)
    if where.scheme != "s3":
        raise StoreError(
            f"{where.url}: the sharder writes to s3:// only (AWS, or MinIO, Ceph, R2 through AWS_ENDPOINT_URL); "
            f"give s3://BUCKET/PREFIX or a local folder"
        )
    return where


_buckets: dict[tuple[int, str], store.Bucket] = {}


def opened(b: Location) -> store.Bucket:
    """This process's client of the bucket (a forked worker makes its own: a client must not cross a fork)."""
    key = (os.getpid(), b.url)
    if key not in _buckets:
        if any(pid != key[0] for pid, _ in _buckets):
            _buckets.clear()
        _buckets[key] = store.Bucket(b.url, workers=16)
    return _buckets[key]


@contextmanager
def errors(b: Location, name: str = ""):
    """The client's exceptions as one line naming the object's URL (pipeline.store's wording)."""
    try:
        yield
    except Exception as e:
        raise opened(b).error(name, e) from None


def fetch(b: Location, name: str) -> tuple[bytes, str, float] | None:
    """An object's bytes, ETag and age in seconds, None if there is none."""
    with errors(b, name):
        try:
            r = opened(b).client.get_object(Bucket=b.bucket, Key=b.key(name))
        except bx.ClientError as e:
            if error_code(e) in MISSING:
                return None
            raise
        now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return r["Body"].read(), r["ETag"], (now - r["LastModified"]).total_seconds()


def get(b: Location, name: str) -> bytes | None:
    found = fetch(b, name)
    return found and found[0]


def put(b: Location, name: str, data: bytes, if_none_match: bool = False, if_match: str | None = None) -> str | None:
    """Write an object, only if there is none (if_none_match) or if it is still `if_match`; its ETag, or None when
    that condition failed."""
    extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
    with errors(b, name):
        try:
            return opened(b).client.put_object(Bucket=b.bucket, Key=b.key(name), Body=data, **extra)["ETag"]
        except bx.ClientError as e:
            if error_code(e) in CONFLICT or (if_none_match and error_code(e) == "409"):
                return None
            raise


def delete(b: Location, *names: str, if_match: str | None = None) -> None:
    for name in names:
        with errors(b, name):
            try:
                opened(b).client.delete_object(
                    Bucket=b.bucket, Key=b.key(name), **({"IfMatch": if_match} if if_match else {})
                )
            except bx.ClientError as e:
                if error_code(e) not in MISSING | CONFLICT:
                    raise


def names(b: Location, under: str = "") -> list[str]:
    """The objects under the prefix (and `under` in it), as names relative to the prefix."""
    return sorted(n for n in opened(b).list() if n.startswith(under))


def check_bucket(b: Location) -> None:
    """Fail before the (long) scan of --src when the bucket cannot be reached."""
    with errors(b):
        try:
            opened(b).client.head_bucket(Bucket=b.bucket)
        except bx.ClientError as e:
            if error_code(e) in MISSING:  # a HEAD has no body to say NoSuchBucket in
                raise StoreError(f"{b.url}: no such bucket '{b.bucket}'; create it or correct the URL") from None
            raise


def stored(b: Location, name: str, size: int, sha256: str) -> bool:
    """Whether the object holds exactly these bytes: its size, then the sha256 the store computed on upload (a
    read-back when the store keeps none)."""
    client = opened(b).client
    with errors(b, name):
        try:
            head = client.head_object(Bucket=b.bucket, Key=b.key(name), ChecksumMode="ENABLED")
        except bx.ClientError as e:
            if error_code(e) in MISSING:
                return False
            raise
        if head["ContentLength"] != size:
            return False
        kept = head.get("ChecksumSHA256")
        if kept and "-" not in kept:
            return base64.b64decode(kept).hex() == sha256
        h = hashlib.sha256()
        for chunk in client.get_object(Bucket=b.bucket, Key=b.key(name))["Body"].iter_chunks(1 << 22):
            h.update(chunk)
        return h.hexdigest() == sha256


def upload(b: Location, path: Path, sha256: str) -> None:
    """Upload one file in one PUT that the store checks against its sha256, then confirm it is there whole."""
    with errors(b, path.name), open(path, "rb") as f:
        opened(b).client.put_object(Bucket=b.bucket, Key=b.key(path.name), Body=f, ChecksumAlgorithm="SHA256")
    if not stored(b, path.name, path.stat().st_size, sha256):
        raise StoreError(f"{b.url}/{path.name}: the uploaded object does not match the shard; rerun to upload again")


def download(b: Location, name: str, path: Path) -> bool:
    """Copy an object to a local file; False, and no file, when there is no such object."""
    with errors(b, name):
        try:
            opened(b).client.download_file(b.bucket, b.key(name), str(path))
            return True
        except bx.ClientError as e:
            if error_code(e) in MISSING:
                return False
            raise


def staging(b: Location, lock: str) -> Path:
    """This machine's folder for shards on their way to the bucket: one per URL and lock (run or rank), under TMPDIR,
    emptied when the run that holds the lock starts (whatever is in it was never trusted)."""
    digest = hashlib.sha256(f"{b.url}\0{lock}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "shard_imagenet" / digest
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def describe(holder: dict) -> str:
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
        f"command: {holder.get('command')}"
    )


def dead(holder: dict) -> bool:
    """A holder on this machine whose process is gone (or its pid reused): its lock may be taken over."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(holder["pid"]).create_time() != holder.get("pid_started")
    except psutil.NoSuchProcess:
        return True
    except (KeyError, TypeError, ValueError):
        return False


def holder_of(b: Location, name: str) -> tuple[dict, str, float] | None:
    found = fetch(b, name)
    if found is None:
        return None
    try:
        return json.loads(found[0]), found[1], found[2]
    except ValueError:
        return {}, found[1], found[2]


def lapsed(current: tuple[dict, str, float]) -> bool:
    holder, _, age = current
    return dead(holder) or age > LEASE


class Lease(threading.Thread):
    """Renews a held lock object (If-Match its last ETag) until stopped; `lost` once another run has taken it over."""

    def __init__(self, b: Location, name: str, body: bytes, etag: str):
        super().__init__(daemon=True)
        self.b, self.name, self.body, self.etag = b, name, body, etag
        self.lost, self.stopped = False, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LEASE / 4):
            try:
                etag = put(self.b, self.name, self.body, if_match=self.etag)
            except StoreError:  # a passing failure: the next renewal is still inside the lease
                continue
            if etag is None:
                self.lost = True
                return
            self.etag = etag


@contextmanager
def hold(b: Location, name: str):
    """Hold the lock object `name` for the block (yielding its Lease), or raise Busy naming its holder. It is created
    with If-None-Match, so of two runs one gets it; a lapsed one is replaced with If-Match, so one takes it over."""
    me = psutil.Process()
    body = json.dumps(
        {
            "host": socket.gethostname(),
            "pid": me.pid,
            "pid_started": me.create_time(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(sys.orig_argv),
        }
    ).encode()
    etag = put(b, name, body, if_none_match=True)
    while etag is None:
        current = holder_of(b, name)
        if current is None:  # released meanwhile
            etag = put(b, name, body, if_none_match=True)
            continue
        if not lapsed(current) or (etag := put(b, name, body, if_match=current[1])) is None:
            raise Busy(
                f"--out {b.url} is being written by another run ({describe(current[0])}); wait for it to end or "
                f"stop it, then rerun (the lock of a run killed on another machine lapses {LEASE:.0f} s after it)"
            )
    lease = Lease(b, name, body, etag)
    lease.start()
    try:
        yield lease
    finally:
        lease.stopped.set()
        lease.join()
        delete(b, name, if_match=lease.etag)


def writer(b: Location, name: str) -> str | None:
    """The run holding lock object `name`, described, or None (a lapsed lock counts as none)."""
    current = holder_of(b, name)
    return None if current is None or lapsed(current) else describe(current[0])
