"""--verify: every shard and index against the manifest's checksums, every image decoded, every source file once."""
from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.manifest import ShardError, UnreadableShard, load_manifest
from pipeline.writer.lock import writer
from pipeline.writer.plan import shown
from pipeline.writer.tars import read_shard
from pipeline.writer.workers import completed


def verify_shard(task) -> tuple[str | None, list[str]]:
    """(None if every sample of the shard is well formed, labelled in range and decodes as an RGB baseline JPEG, else
    the problem; the samples' source paths)."""
    tar_path, count, num_classes = task
    try:
        samples = read_shard(tar_path)
        paths = [s.path for s in samples]
        if len(samples) != count:
            return f"{tar_path}: {len(samples)} samples, manifest says {count}", paths
        for s in samples:
            if not 0 <= s.label < num_classes:
                return (f"{tar_path}: sample {s.key} ({shown(s.path)}) has label {s.label}, "
                        f"outside 0..{num_classes - 1}"), paths
            im = Image.open(io.BytesIO(s.jpeg))
            im.load()
            if im.format != "JPEG" or im.mode != "RGB" or im.info.get("progressive"):
                return f"{tar_path}: {s.key}.jpg ({shown(s.path)}) is not an RGB baseline JPEG", paths
    except Exception as e:  # any failure to read or decode is the finding, reported with the shard's name
        return f"{tar_path}: {type(e).__name__}: {e}", []
    return None, paths


def verify(shards_dir: Path, workers: int) -> int:
    """Exit code 0 when every shard and index matches the manifest, every image decodes and no source file is in the
    shards twice; else 1, naming the shard or file; 2 when a file cannot be read at all or a run is writing them."""
    if holder := writer(shards_dir):
        print(f"{shards_dir} is being written by a run in progress ({holder}); verify it once that run has ended",
              file=sys.stderr)
        return 2
    try:
        m = load_manifest(shards_dir, checksums=True)
    except ShardError as e:
        print(e, file=sys.stderr)
        return 2 if isinstance(e, UnreadableShard) else 1
    tasks = [(s.tar, s.count, m.num_classes) for split in m.splits for s in m.splits[split]]
    results = tqdm(completed(verify_shard, tasks, workers), total=len(tasks), unit="shard", desc="verifying")
    problems, sources = [], Counter()
    for _, (problem, paths) in sorted(results, key=lambda r: r[0]):
        problems += [problem] if problem else []
        sources.update(paths)
    # Each source file is one sample: a path written twice means the shards were made from two different plans.
    problems += [f"{shards_dir}: {shown(path)} is in the shards {n} times" for path, n in sources.items() if n > 1]
    for p in problems:
        print(f"{p}; re-shard with tools/shard_imagenet.py", file=sys.stderr)
    if not problems:
        print(f"{shards_dir}: {len(tasks)} shards, {sum(m.count(s) for s in m.splits)} images: all intact")
    return 1 if problems else 0
