"""--verify: every shard and index against the manifest's checksums, every image decoded, every source file once, and
nothing in the folder that the manifest does not list."""

from __future__ import annotations

import io
import os
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.lock import writer
from pipeline.manifest import (
    CHECKSUM,
    MANIFEST,
    RESHARD_HINT,
    Shard,
    ShardError,
    UnreadableShard,
    check_shard,
    content_sha256,
    load_manifest,
)
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
    if CHECKSUM not in m.raw:
        print(
            f"{shards_dir / MANIFEST}: has no checksum of its own (an older sharder's): its statistics and lists are "
            f"not checked; re-shard to add one"
        )
    elif m.raw[CHECKSUM] != content_sha256(m.raw):
        problems.append(
            f"{shards_dir / MANIFEST}: its content does not match its own checksum (edited since it was written?); "
            f"re-shard with tools/shard_imagenet.py"
        )
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
