"""--verify: every shard and index against the manifest's checksums, every image decoded, every source file once, and
nothing in the folder that the manifest does not list."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.lock import writer
from pipeline.manifest import (
    CHECKSUM,
    MANIFEST,
    RESHARD_HINT,
    Manifest,
    Shard,
    ShardError,
    UnreadableShard,
    check_shard,
    content_sha256,
    load_manifest,
)
from pipeline.store import Location
from pipeline.writer import bucket
from pipeline.writer.jpeg import structure
from pipeline.writer.plan import shown
from pipeline.writer.tars import read_shard
from pipeline.writer.workers import completed

RESHARD = "; re-shard with tools/shard_imagenet.py"


def verify_shard(task) -> tuple[str | None, bool, list[str]]:
    """(None if the shard and index match the manifest and every sample is well formed, labelled in range and decodes
    as an 8-bit Huffman baseline RGB JPEG, else the problem; whether it was unreadable; the samples' source paths)."""
    shard, num_classes = task
    try:
        check_shard(shard, True, RESHARD_HINT.format(dir=shard.tar.parent))
    except UnreadableShard as e:
        return str(e), True, []
    except ShardError as e:
        return str(e), False, []
    tar_path = shard.tar
    try:
        samples = read_shard(tar_path)
        paths = [s.path for s in samples]
        if len(samples) != shard.count:
            return f"{tar_path}: {len(samples)} samples, manifest says {shard.count}{RESHARD}", False, paths
        for s in samples:
            if not 0 <= s.label < num_classes:
                return (
                    (
                        f"{tar_path}: sample {s.key} ({shown(s.path)}) has label {s.label}, "
                        f"outside 0..{num_classes - 1}{RESHARD}"
                    ),
                    False,
                    paths,
                )
            im = Image.open(io.BytesIO(s.jpeg))
            im.load()
            jpeg = structure(s.jpeg)
            if im.format != "JPEG" or im.mode != "RGB" or not jpeg.kept_by_every_decoder():
                return (
                    (
                        f"{tar_path}: {s.key}.jpg ({shown(s.path)}) is not an RGB 8-bit baseline JPEG "
                        f"({im.format} {im.mode}, {jpeg.precision}-bit {jpeg.kind}){RESHARD}"
                    ),
                    False,
                    paths,
                )
    except Exception as e:  # any failure to read or decode is the finding, reported with the shard's name
        return f"{tar_path}: {type(e).__name__}: {e}{RESHARD}", False, []
    return None, False, paths


def strays(shards_dir: Path, shards: list[Shard]) -> list[str]:
    """Files beside the shards that the manifest does not list: readers that glob *.tar would read a stray copy too.
    Hidden files (a run's own records) are not read by such globs."""
    listed = {MANIFEST, *(f.name for s in shards for f in (s.tar, s.index))}
    return [
        f"{shards_dir / name}: not listed in {MANIFEST} (a stray copy? readers that glob the folder would read "
        f"it too); move it out of {shards_dir}"
        for name in sorted(os.listdir(shards_dir))
        if name not in listed and not name.startswith(".")
    ]


def own_checksum(m: Manifest, where: str) -> list[str]:
    """The manifest against its own checksum: a problem if they differ; a manifest of an older sharder has none."""
    if CHECKSUM not in m.raw:
        print(
            f"{where}: has no checksum of its own (an older sharder's): its statistics are not checked; "
            f"re-shard to add one"
        )
        return []
    if m.raw[CHECKSUM] != content_sha256(m.raw):
        return [f"{where}: its content does not match its own checksum (edited since it was written?){RESHARD}"]
    return []


def verify(shards_dir: Path, workers: int) -> int:
    """Exit code 0 when every shard and index matches the manifest, every image decodes, no source file is in the
    shards twice and nothing else is in the folder; else 1, naming every problem; 2 when a file cannot be read or a
    run is writing them."""
    if shards_dir.exists() and not shards_dir.is_dir():
        print(f"--verify {shards_dir}: a file; pass the shard folder (the one holding {MANIFEST})", file=sys.stderr)
        return 2
    if holder := writer(shards_dir):
        print(
            f"{shards_dir} is being written by a run in progress ({holder}); verify it once that run has ended",
            file=sys.stderr,
        )
        return 2
    try:
        m = load_manifest(shards_dir, check_shards=False, fix=RESHARD_HINT)
    except ShardError as e:
        print(e, file=sys.stderr)
        return 2 if isinstance(e, UnreadableShard) else 1
    shards = [s for split in m.splits for s in m.splits[split]]
    tasks = [(s, m.num_classes) for s in shards]
    problems, unreadable, sources = strays(shards_dir, shards), False, Counter()
    problems += own_checksum(m, str(shards_dir / MANIFEST))
    results = tqdm(
        completed(verify_shard, tasks, workers), total=len(tasks), unit="shard", desc="verifying", disable=None
    )
    for _, (problem, denied, paths) in sorted(results, key=lambda r: r[0]):
        problems += [problem] if problem else []
        unreadable |= denied
        sources.update(paths)
    # Each source file is one sample: a path written twice means the shards were made from two different plans.
    problems += [
        f"{shards_dir}: {shown(path)} is in the shards {n} times{RESHARD}" for path, n in sources.items() if n > 1
    ]
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 2 if unreadable else 1
    print(f"{shards_dir}: {len(tasks)} shards, {sum(m.count(s) for s in m.splits)} images: all intact")
    return 0


def fetch_and_verify(task) -> tuple[str | None, bool, list[str]]:
    """verify_shard on a shard copied from the bucket into a local folder, which it leaves as it found it (a missing
    object is a missing file there)."""
    shard, num_classes, b = task
    try:
        for f in (shard.tar, shard.index):
            bucket.download(b, f.name, f)
        return verify_shard((shard, num_classes))
    finally:
        shard.tar.unlink(missing_ok=True)
        shard.index.unlink(missing_ok=True)


def verify_bucket(b: Location, workers: int) -> int:
    """verify() for s3://bucket/prefix: each shard is downloaded, checked and deleted in turn (`workers` at a time);
    every missing, damaged or stray object is named by its URL."""
    holders = [h for n in bucket.names(b) if n.startswith(".lock") and "/" not in n and (h := bucket.writer(b, n))]
    if holders:
        print(
            f"{b.url} is being written by a run in progress ({holders[0]}); verify it once it has ended",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="shard_imagenet-verify-") as tmp:
        return verify_copied(b, Path(tmp), workers, lambda text: text.replace(tmp, b.url))


def verify_copied(b: Location, tmp: Path, workers: int, named) -> int:
    raw = bucket.get(b, MANIFEST)
    if raw is None:
        print(
            f"{b.url}/{MANIFEST}: missing; run tools/shard_imagenet.py --src IMAGENET --out {b.url} first",
            file=sys.stderr,
        )
        return 1
    (tmp / MANIFEST).write_bytes(raw)
    try:
        m = load_manifest(tmp, check_shards=False, fix=RESHARD_HINT)
    except ShardError as e:
        print(named(str(e)), file=sys.stderr)
        return 1
    shards = [s for split in m.splits for s in m.splits[split]]
    listed = {MANIFEST, *(f.name for s in shards for f in (s.tar, s.index))}
    problems = own_checksum(m, f"{b.url}/{MANIFEST}") + [
        f"{b.url}/{name}: not listed in {MANIFEST} (a stray copy? readers that list the prefix would read it too); "
        f"delete it or move it elsewhere"
        for name in sorted(bucket.names(b))
        if name not in listed and not name.startswith(".")
    ]
    tasks = [(s, m.num_classes, b) for s in shards]
    results = tqdm(
        completed(fetch_and_verify, tasks, workers), total=len(tasks), unit="shard", desc="verifying", disable=None
    )
    sources = Counter()
    for _, (problem, _, paths) in sorted(results, key=lambda r: r[0]):
        problems += [named(problem)] if problem else []
        sources.update(paths)
    problems += [f"{b.url}: {shown(p)} is in the shards {n} times{RESHARD}" for p, n in sources.items() if n > 1]
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"{b.url}: {len(tasks)} shards, {sum(m.count(s) for s in m.splits)} images: all intact")
    return 0
