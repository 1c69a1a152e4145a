"""The node's cache of a bucket's shard folder: every shard and index downloaded whole, in parallel, and checked
against the manifest's sha256 before the folder is handed to the loader, which then reads local files only.

DALI can read s3:// itself, but one ranged GET per sample member, one after another, is orders of magnitude slower
than local files; whole objects fetched in parallel are not. A complete, verified cache is reused without fetching
any shard: `.verified.json` records the manifest's sha256 and each file's size and mtime as verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.atomic import atomic_write
from pipeline.lock import FolderLock
from pipeline.manifest import MANIFEST, ShardError
from pipeline.settings import option
from pipeline.store import Bucket, NoSuchObject, StoreError, is_url, parse_url

MARKER, LOCK = ".verified.json", ".lock"
WORKERS = 16  # objects in flight: enough to hide ~25 ms per request behind the transfers (docs/storage.md)
HINT = "re-shard into the bucket with tools/shard_imagenet.py --out {url}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet-dali"


@dataclass(kw_only=True)
class CacheSettings:
    """Shards read from a bucket"""

    cache_dir: str = option(
        "",
        "where --shards s3://... or gs://... is downloaded and verified before training, reused by later runs; "
        "empty: $XDG_CACHE_HOME/alexnet-dali, else ~/.cache/alexnet-dali",
        saved=False,  # a node's own folder: config.json and checkpoints record the bucket's URL alone
    )


@dataclass
class Filled:
    root: Path
    fetched: int  # objects downloaded by this call
    bytes: int
    seconds: float


def local_shards(shards: str, cache_dir: str, say: Callable[[str], None] = print) -> str:
    """The folder to read `shards` from: itself if local; for a bucket URL, the node's verified cache of it."""
    if not is_url(shards):
        return shards
    root = cache_root(shards, cache_dir)
    try:
        return str(fill(Bucket(shards, workers=WORKERS), root, say=say).root)
    except OSError as e:  # the cache's disk: full, read-only, not ours
        raise ShardError(
            f"{e.filename or root}: cannot write the cache ({e.strerror}); make room or pass another --cache-dir, "
            f"then rerun: downloads continue where they stopped"
        ) from None


def cache_root(url: str, cache_dir: str) -> Path:
    where = parse_url(url)
    return Path(cache_dir or default_cache_dir()).expanduser() / where.scheme / where.bucket / where.prefix


def wanted(raw: dict, url: str) -> dict[str, tuple[int | None, str]]:
    """Every file the manifest names: name -> (size if the manifest gives it, sha256)."""
    try:
        files = {}
        for entry in raw["splits"].values():
            for s in entry["shards"]:
                files[s["tar"]] = (int(s["tar_bytes"]), s["tar_sha256"])
                files[s["index"]] = (None, s["index_sha256"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardError(f"{url}/{MANIFEST}: malformed ({type(e).__name__}: {e}); {HINT.format(url=url)}") from None
    for name in files:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or name.startswith("."):
            raise ShardError(f"{url}/{MANIFEST}: names '{name}', outside the folder; {HINT.format(url=url)}")
    return files


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def fill(bucket: Bucket, root: Path, *, workers: int = WORKERS, say=print, bar: bool = True) -> Filled:
    """Bring `root` to a verified copy of the bucket's shard folder; raise a one-line ShardError if an object is
    missing or differs from the manifest, with nothing of it left where the loader would read it."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(root / LOCK)  # one filler per cache folder on this node (torchrun's local ranks too)
    lock.acquire(wait=lambda holder: say(f"{root}: {holder} is filling this cache; waiting for it"))
    try:
        try:
            text = bucket.read(MANIFEST)
        except NoSuchObject:
            raise ShardError(
                f"{bucket.name_url(MANIFEST)}: missing (it is written last: without it the folder is not complete); "
                f"run tools/shard_imagenet.py --src IMAGENET --out {bucket.url} first"
            ) from None
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ShardError(f"{bucket.name_url(MANIFEST)}: unreadable ({e}); {HINT.format(url=bucket.url)}") from None
        digest = hashlib.sha256(text).hexdigest()
        files = wanted(raw, bucket.url)
        old = read_marker(root)
        verified = {
            name: rec
            for name, rec in old.get("files", {}).items()
            if name in files and rec[2] == files[name][1] and (root / name).is_file() and stamp(root / name) == rec[:2]
        }
        todo = {name: files[name] for name in files if name not in verified}
        got = fetch(bucket, root, todo, workers, say, bar) if todo else {}
        verified.update(got)
        atomic_write(root / MANIFEST, text)
        atomic_write(root / MARKER, json.dumps({"manifest_sha256": digest, "files": verified}, indent=0).encode())
    finally:
        lock.release()
    size = sum(verified[n][0] for n in got)
    took = time.perf_counter() - t0
    if got:
        say(f"{bucket.url}: {len(got)} objects, {size / 1e6:.1f} MB fetched into {root} in {took:.1f} s")
    else:
        say(f"{bucket.url}: the verified cache {root} reused, nothing fetched")
    return Filled(root, len(got), size, took)


def read_marker(root: Path) -> dict:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def fetch(bucket: Bucket, root: Path, todo: dict, workers: int, say, bar: bool) -> dict[str, list]:
    """Download and verify `todo` (name -> (size, sha256)), `workers` at a time; name -> [size, mtime_ns, sha256]."""
    listing = bucket.list()
    missing = sorted(n for n in todo if n not in listing)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ShardError(
            f"{bucket.name_url(missing[0])}{more}: missing from the bucket, though {MANIFEST} lists it; "
            f"{HINT.format(url=bucket.url)}"
        )
    for name, (size, _) in todo.items():
        if size is not None and listing[name] != size:
            raise ShardError(
                f"{bucket.name_url(name)}: {listing[name]} bytes, {MANIFEST} says {size}; {HINT.format(url=bucket.url)}"
            )
    stop, lock, out = threading.Event(), threading.Lock(), {}
    progress = tqdm(
        total=sum(listing[n] for n in todo),
        unit="B",
        unit_scale=True,
        desc="fetching",
        dynamic_ncols=True,
        disable=not bar,
    )

    def download(name: str, dest: Path) -> tuple[bool, str]:
        """The object to `dest`, hashed as it arrives (no second read); whether it continued a part, its sha256."""
        digest = hashlib.sha256()

        def sink(chunk: bytes) -> None:
            if stop.is_set():
                raise StoreError(f"{bucket.url}: stopped")
            digest.update(chunk)
            with lock:
                progress.update(len(chunk))

        return bucket.download(name, dest, listing[name], sink), digest.hexdigest()

    def one(name: str) -> None:
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)  # a file not (or no longer) verified is never left where the loader reads
        resumed, digest = download(name, dest)
        if digest != todo[name][1] and resumed:  # the part may be of an object since rewritten: start it again
            dest.unlink()
            progress.update(-listing[name])
            _, digest = download(name, dest)
        if digest != todo[name][1]:
            dest.unlink()
            raise ShardError(
                f"{bucket.name_url(name)}: its sha256 differs from {MANIFEST}'s (changed since it was sharded?); "
                f"nothing was trained; {HINT.format(url=bucket.url)}"
            )
        out[name] = [*stamp(dest), todo[name][1]]

    with progress, ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(one, n) for n in sorted(todo, key=lambda n: -listing[n])]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f.exception() for f in done if f.exception()), None)
        if failed is not None:
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise failed
    return out
