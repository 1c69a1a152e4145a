"""From a scanned source to shards: sample keys, the listing's fingerprint, and the seeded shuffle cut into shards."""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np

from pipeline.writer.layout import Entry, Source


def keyed(entries: list[Entry], split: str) -> list[tuple[str, Entry]]:
    """Each sample's key: the split and the position in its sorted relative paths (train_00000000 ...). Unique in the
    folder, short and ASCII whatever the file names are (camera names repeat across classes; a tar header holds 100
    bytes of UTF-8), and the same for the same listing."""
    return [(f"{split}_{i:08d}", e) for i, e in enumerate(sorted(entries, key=lambda e: e.rel))]


def fingerprint(src: Source) -> str:
    """sha256 of what the output depends on in the source: classes, every file's path, size, mtime and label, and
    what was rejected while listing. A rerun compares it to tell a resumable run from a changed folder."""
    h = hashlib.sha256(json.dumps(src.classes, sort_keys=True).encode())
    for split in sorted(src.samples):
        for e in sorted(src.samples[split], key=lambda e: e.rel):
            h.update(f"{split}\0{e.rel}\0{e.size}\0{e.mtime_ns}\0{e.label}\n".encode("utf-8", "surrogateescape"))
    for r in sorted(src.rejected, key=lambda r: (r["file"], r["reason"])):
        h.update(f"rejected\0{r['file']}\0{r['reason']}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def plan(entries: list[Entry], split: str, shard_size: int, seed: int) -> list[tuple[str, list[tuple[str, Entry]]]]:
    """Shuffle a split with the seed (DALI only shuffles within a buffer) and cut it into shards of (key, entry)."""
    samples = keyed(entries, split)
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(samples))
    shuffled = [samples[i] for i in order]
    return [
        (f"{split}-{i // shard_size:06d}", shuffled[i : i + shard_size]) for i in range(0, len(shuffled), shard_size)
    ]


def shown(name: str) -> str:
    """A file name fit for one line of a terminal: bytes that are not UTF-8 and control characters escaped."""
    return name if name.isprintable() else ascii(name)[1:-1]
