"""A shard folder in an S3 bucket (AWS, or MinIO, Ceph, R2 through AWS_ENDPOINT_URL), through boto3 and its standard
credential chain: the URL, reads and listings, uploads checked against their sha256, and a lock object made by a
conditional write (If-None-Match), renewed while its run lives and taken over only from a holder that is certainly
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
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import boto3
import psutil
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from pipeline.lock import Busy

SCHEME = "s3"
MISSING = {"404", "NoSuchKey", "NotFound"}
REFUSED = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
# Seconds a lock object stays valid after its holder last renewed it (4 times per lease). Its age is measured on the
# store's clock alone (the Date of a response minus the object's Last-Modified), so machines' clocks need not agree.
LEASE = 120.0


class BucketError(Exception):
    """The bucket cannot be used (no such bucket, access denied, no connection); one line naming the URL."""


@dataclass(frozen=True)
class Bucket:
    name: str
    prefix: str  # no leading or trailing "/"; "" for the bucket's root

    @property
    def url(self) -> str:
        return f"{SCHEME}://{self.name}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def parse_url(text: str) -> Bucket | None:
    """s3://bucket/prefix as a Bucket, None for a local path; ValueError (one line) for any other URL."""
    if "://" not in text:
        return None
    u = urllib.parse.urlsplit(text)
    if u.scheme != SCHEME:
        raise ValueError(
            f"{text}: {u.scheme or 'this'}:// URLs are not supported; use s3://BUCKET/PREFIX (AWS, or MinIO, Ceph, "
            f"R2 through AWS_ENDPOINT_URL) or a local folder"
        )
    if "@" in u.netloc:  # never echo the secret back
        raise ValueError(
            f"{SCHEME}://...@{u.hostname}: a URL carrying credentials; remove them from the URL and use "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
        )
    if not u.netloc or u.query or u.fragment or ".." in u.path.split("/"):
        raise ValueError(f"{text}: not a bucket URL; use s3://BUCKET/PREFIX")
    return Bucket(u.netloc, u.path.strip("/"))


_clients: dict[int, object] = {}


def client():
    """This process's S3 client (a forked worker makes its own: a client must not cross a fork)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients.clear()
        _clients[pid] = boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": 8, "mode": "adaptive"})
        )
    return _clients[pid]


def code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


@contextmanager
def errors(url: str):
    """The client's exceptions as one line naming the URL and the fix."""
    try:
        yield
    except ClientError as e:
        c = code(e)
        if c == "NoSuchBucket":
            raise BucketError(f"{url}: no such bucket; create it or correct the URL") from None
        if c in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise BucketError(
                f"{url}: access denied ({c}); check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID) and the "
                f"bucket's policy"
            ) from None
        raise BucketError(f"{url}: {c}: {e.response.get('Error', {}).get('Message', e)}") from None
    except NoCredentialsError:
        raise BucketError(
            f"{url}: no credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
        ) from None
    except EndpointConnectionError as e:
        raise BucketError(f"{url}: cannot connect to {e.kwargs.get('endpoint_url')}; check AWS_ENDPOINT_URL") from None
    except BotoCoreError as e:
        raise BucketError(f"{url}: {type(e).__name__}: {e}") from None


def fetch(b: Bucket, name: str) -> tuple[bytes, str, float] | None:
    """An object's bytes, ETag and age in seconds, None if there is none."""
    with errors(b.url):
        try:
            r = client().get_object(Bucket=b.name, Key=b.key(name))
        except ClientError as e:
            if code(e) in MISSING:
                return None
            raise
        now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return r["Body"].read(), r["ETag"], (now - r["LastModified"]).total_seconds()


def get(b: Bucket, name: str) -> bytes | None:
    found = fetch(b, name)
    return found and found[0]


def put(b: Bucket, name: str, data: bytes, if_none_match: bool = False, if_match: str | None = None) -> str | None:
    """Write an object, only if there is none (if_none_match) or if it is still `if_match`; its ETag, or None when
    that condition failed."""
    extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
    with errors(b.url):
        try:
            return client().put_object(Bucket=b.name, Key=b.key(name), Body=data, **extra)["ETag"]
        except ClientError as e:
            if code(e) in REFUSED or (if_none_match and code(e) == "409"):
                return None
            raise


def delete(b: Bucket, *names: str, if_match: str | None = None) -> None:
    with errors(b.url):
        for name in names:
            try:
                client().delete_object(Bucket=b.name, Key=b.key(name), **({"IfMatch": if_match} if if_match else {}))
            except ClientError as e:
                if code(e) not in MISSING | REFUSED:
                    raise


def names(b: Bucket, under: str = "") -> list[str]:
    """The objects under the prefix (and `under` in it), as names relative to the prefix."""
    start = b.key(under) if under else (b.prefix + "/" if b.prefix else "")
    with errors(b.url):
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=b.name, Prefix=start)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return [k[len(b.prefix) + 1 :] if b.prefix else k for k in keys]


def check_bucket(b: Bucket) -> None:
    """Fail before the (long) scan of --src when the bucket cannot be reached."""
    with errors(b.url):
        try:
            client().head_bucket(Bucket=b.name)
        except ClientError as e:
            if code(e) in MISSING:  # a HEAD has no body to say NoSuchBucket in
                raise BucketError(f"{b.url}: no such bucket; create it or correct the URL") from None
            raise


def stored(b: Bucket, name: str, size: int, sha256: str) -> bool:
    """Whether the object holds exactly these bytes: its size, then the sha256 the store computed on upload (a
    read-back when the store keeps none)."""
    with errors(b.url):
        try:
            head = client().head_object(Bucket=b.name, Key=b.key(name), ChecksumMode="ENABLED")
        except ClientError as e:
            if code(e) in MISSING:
                return False
            raise
        if head["ContentLength"] != size:
            return False
        kept = head.get("ChecksumSHA256")
        if kept and "-" not in kept:
            return base64.b64decode(kept).hex() == sha256
        h = hashlib.sha256()
        for chunk in client().get_object(Bucket=b.name, Key=b.key(name))["Body"].iter_chunks(1 << 22):
            h.update(chunk)
        return h.hexdigest() == sha256


def upload(b: Bucket, path: Path, sha256: str) -> None:
    """Upload one file in one PUT that the store checks against its sha256, then confirm it is there whole."""
    with errors(b.url), open(path, "rb") as f:
        client().put_object(Bucket=b.name, Key=b.key(path.name), Body=f, ChecksumAlgorithm="SHA256")
    if not stored(b, path.name, path.stat().st_size, sha256):
        raise BucketError(f"{b.url}/{path.name}: the uploaded object does not match the shard; rerun to upload again")


def download(b: Bucket, name: str, path: Path) -> bool:
    """Copy an object to a local file; False, and no file, when there is no such object."""
    with errors(b.url):
        try:
            client().download_file(b.name, b.key(name), str(path))
            return True
        except ClientError as e:
            if code(e) in MISSING:
                return False
            raise


def staging(b: Bucket, lock: str) -> Path:
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


def holder_of(b: Bucket, name: str) -> tuple[dict, str, float] | None:
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

    def __init__(self, b: Bucket, name: str, body: bytes, etag: str):
        super().__init__(daemon=True)
        self.b, self.name, self.body, self.etag = b, name, body, etag
        self.lost, self.stopped = False, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(LEASE / 4):
            try:
                etag = put(self.b, self.name, self.body, if_match=self.etag)
            except BucketError:  # a passing failure: the next renewal is still inside the lease
                continue
            if etag is None:
                self.lost = True
                return
            self.etag = etag


@contextmanager
def hold(b: Bucket, name: str):
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


def writer(b: Bucket, name: str) -> str | None:
    """The run holding lock object `name`, described, or None (a lapsed lock counts as none)."""
    current = holder_of(b, name)
    return None if current is None or lapsed(current) else describe(current[0])
