"""Object storage for shard folders: s3:// (AWS, MinIO, Ceph, R2) and gs:// (GCS through its S3-compatible XML API)
by one boto3 client. Credentials come only from boto3's standard chain; every failure is one line naming the URL."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bx
import botocore.session
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config as BotoConfig

from pipeline.manifest import ShardError

SCHEMES = ("s3", "gs")
GCS_ENDPOINT = "https://storage.googleapis.com"
ATTEMPTS = 8  # boto3's "standard" retries: exponential backoff with jitter, capped at 20 s; AWS_MAX_ATTEMPTS overrides
USAGE = "give s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a local folder"
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "Forbidden"}
MISSING = {"NoSuchKey", "404", "NotFound"}
CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
# Errors met while a body streams in, after botocore's own retries of the request are over.
STREAM_ERRORS = (bx.ReadTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError, bx.ConnectionClosedError)


class StoreError(ShardError):
    """A bucket that cannot be read or written; the message is one line naming the URL."""


class NoSuchObject(StoreError):
    """The bucket has no object under that name."""


def error_code(e: bx.ClientError) -> str:
    """The store's error code ("NoSuchKey", "412", ...) of a failed request."""
    return str(e.response.get("Error", {}).get("Code", ""))


def is_url(path: str) -> bool:
    return "://" in str(path)


@dataclass(frozen=True)
class Location:
    scheme: str
    bucket: str
    prefix: str  # no leading or trailing slash

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def parse_url(url: str) -> Location:
    """s3://bucket/prefix or gs://bucket/prefix; any other scheme, and a URL carrying credentials, refused."""
    parts = urlsplit(url)
    if "@" in parts.netloc or parts.query or parts.fragment:
        shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        raise StoreError(
            f"{shown}: the URL carries credentials or parameters; give them through the environment "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role) and {USAGE}"
        )
    if parts.scheme not in SCHEMES:
        raise StoreError(f"{url}: unsupported URL scheme '{parts.scheme}'; {USAGE}")
    prefix = parts.path.strip("/")
    if ":" in parts.netloc:
        raise StoreError(f"{url}: a bucket name has no port; give the store's address in AWS_ENDPOINT_URL and {USAGE}")
    if not parts.netloc or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
        raise StoreError(f"{url}: not a bucket URL; {USAGE}")
    return Location(parts.scheme, parts.netloc, prefix)


def make_client(scheme: str, workers: int, timeout: float):
    """A thread-safe client with retries; GCS at its XML endpoint, custom S3 endpoints (MinIO, moto) path-style."""
    core = botocore.session.Session()
    session = boto3.session.Session(botocore_session=core)
    attempts = core.get_config_variable("max_attempts") or ATTEMPTS
    options = dict(
        retries={"total_max_attempts": attempts, "mode": core.get_config_variable("retry_mode") or "standard"},
        connect_timeout=timeout,
        read_timeout=timeout,
        max_pool_connections=max(10, workers),
        response_checksum_validation="when_required",  # the cache checks every object's sha256 against the manifest
    )
    if scheme == "gs":  # GCS takes neither the new default CRC trailers nor chunked uploads
        options.update(request_checksum_calculation="when_required")
        return session.client("s3", endpoint_url=GCS_ENDPOINT, config=BotoConfig(**options))
    client = session.client("s3", config=BotoConfig(**options))
    if "amazonaws.com" not in client.meta.endpoint_url:  # virtual-hosted buckets need DNS names only AWS has
        client = session.client("s3", config=BotoConfig(s3={"addressing_style": "path"}, **options))
    return client


class Bucket:
    """The objects under one s3:// or gs:// prefix, named relative to it; safe to share between threads."""

    def __init__(self, url: str, *, workers: int = 8, timeout: float = 60.0):
        self.where = parse_url(url)
        self.url = self.where.url
        try:
            self.client = make_client(self.where.scheme, workers, timeout)
        except bx.BotoCoreError as e:  # a malformed AWS_ENDPOINT_URL or profile
            raise StoreError(f"{self.url}: cannot configure the client ({e})") from None
        self.attempts = self.client.meta.config.retries["total_max_attempts"]

    def name_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def call(self, name: str, fn: Callable, **kw):
        """fn(Bucket=, **kw) on the client, any failure as a StoreError naming the object's URL."""
        try:
            return fn(Bucket=self.where.bucket, **kw)
        except Exception as e:
            raise self.error(name, e) from None

    def error(self, name: str, e: Exception) -> Exception:
        url = self.name_url(name) if name else self.url
        endpoint = self.client.meta.endpoint_url
        if isinstance(e, bx.ClientError):
            code = error_code(e)
            if code == "NoSuchBucket":
                return StoreError(f"{url}: no such bucket '{self.where.bucket}' at {endpoint}; check the URL")
            if code in DENIED:
                return StoreError(
                    f"{url}: access denied ({code}); check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                    f"AWS_PROFILE or the instance role) and their permissions"
                )
            if code in MISSING:
                return NoSuchObject(f"{url}: no such object")
            return StoreError(f"{url}: {code} ({e.response.get('Error', {}).get('Message', '')})")
        if isinstance(e, bx.NoCredentialsError):
            return StoreError(
                f"{url}: no credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                f"or run where an instance role gives them"
            )
        if isinstance(e, bx.ConnectTimeoutError | bx.ReadTimeoutError):
            return StoreError(f"{url}: timed out talking to {endpoint} ({self.attempts} attempts); check the network")
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectionClosedError):
            return StoreError(
                f"{url}: cannot connect to {endpoint} ({self.attempts} attempts); check AWS_ENDPOINT_URL "
                f"and that the store is up"
            )
        if isinstance(e, bx.BotoCoreError):
            return StoreError(f"{url}: {e}")
        return e

    def list(self) -> dict[str, int]:
        """Every object under the prefix: name relative to it -> size in bytes."""
        out, start = {}, self.where.key("")
        pages = self.client.get_paginator("list_objects_v2").paginate
        try:
            for page in pages(Bucket=self.where.bucket, Prefix=start):
                out.update({o["Key"][len(start) :]: o["Size"] for o in page.get("Contents", [])})
        except Exception as e:
            raise self.error("", e) from None
        return out

    def head(self, name: str) -> dict | None:
        """The object's size and ETag, or None if there is none."""
        try:
            r = self.client.head_object(Bucket=self.where.bucket, Key=self.where.key(name))
        except bx.ClientError as e:
            if error_code(e) in MISSING:
                return None
            raise self.error(name, e) from None
        except Exception as e:
            raise self.error(name, e) from None
        return {"size": r["ContentLength"], "etag": r["ETag"]}

    def read(self, name: str) -> bytes:
        """A small object's bytes (the manifest)."""
        return self.call(name, self.client.get_object, Key=self.where.key(name))["Body"].read()

    def download(self, name: str, dest: Path, size: int, sink: Callable[[bytes], None] = lambda b: None) -> bool:
        """The object, whole, to `dest` through `dest`.part, every byte also given to `sink` in order: a part left by
        a stopped download is continued with a ranged GET, and a stream broken midway is retried with backoff from
        where it broke. True if it continued a part."""
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        resumed = have > 0
        if resumed:
            with open(part, "rb") as f:
                while block := f.read(1 << 20):
                    sink(block)
        for attempt in range(self.attempts):
            try:
                with open(part, "ab") as f:
                    if have < size:
                        kw = {"Range": f"bytes={have}-"} if have else {}
                        body = self.call(name, self.client.get_object, Key=self.where.key(name), **kw)["Body"]
                        for chunk in body.iter_chunks(1 << 20):
                            f.write(chunk)
                            sink(chunk)
                break
            except STREAM_ERRORS as e:
                if attempt + 1 == self.attempts:
                    raise self.error(name, e) from None
                time.sleep(min(20.0, 0.1 * 2**attempt))
                have = part.stat().st_size
        if part.stat().st_size != size:
            raise StoreError(f"{self.name_url(name)}: {part.stat().st_size} bytes read, {size} listed (changed?)")
        os.replace(part, dest)
        return resumed

    def upload(self, src: Path, name: str) -> None:
        """A local file to the object `name`, multipart when large (boto3's transfer manager)."""
        try:
            self.client.upload_file(str(src), self.where.bucket, self.where.key(name))
        except S3UploadFailedError as e:  # the transfer manager's wrapper of the ClientError it met
            raise self.error(name, e.__context__ or e) from None
        except Exception as e:
            raise self.error(name, e) from None
