"""Deterministic WebDataset tars with DALI index files, written atomically."""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.atomic import atomic_file, atomic_write
from pipeline.manifest import CLS_EXT, IMAGE_EXT, LABEL_EXT, PATH_EXT, sha256_file

BLOCK = tarfile.BLOCKSIZE  # a USTAR header is one block; the member's data follows it
INDEX_VERSION = "v1.2"  # the header DALI's wds2idx writes and fn.readers.webdataset expects


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    label: int
    path: str  # the source file, relative to --src (bytes that are not UTF-8 surrogate-escaped, as os gives them)


@dataclass(frozen=True)
class ShardRecord:
    tar: str
    index: str
    count: int
    tar_bytes: int
    tar_sha256: str
    index_sha256: str


def members(sample: Sample) -> list[tuple[str, bytes]]:
    """A sample's tar members in contract order: image, ASCII label, int32 little-endian label, original path (the
    file name's own bytes, so any name the filesystem allows is recorded exactly)."""
    return [
        (f"{sample.key}.{IMAGE_EXT}", sample.jpeg),
        (f"{sample.key}.{CLS_EXT}", str(sample.label).encode()),
        (f"{sample.key}.{LABEL_EXT}", struct.pack("<i", sample.label)),
        (f"{sample.key}.{PATH_EXT}", sample.path.encode("utf-8", "surrogateescape")),
    ]


MEMBERS = 4  # len(members(sample))


def write_tar(f: BinaryIO, samples: Iterable[Sample]) -> tuple[int, bytes]:
    """Stream the samples into f as a USTAR archive with nothing that varies between runs (mtime 0, owner 0:0 with no
    names, mode 0644); returns the sample count and the DALI index (one line per sample: ext offset size name, per
    member)."""
    lines = []
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            fields = []
            for name, data in members(sample):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uname, info.gname = len(data), 0o644, "", ""
                fields.append(f"{name.split('.', 1)[1]} {tf.offset + BLOCK} {len(data)} {name}")
                tf.addfile(info, io.BytesIO(data))
            lines.append(" ".join(fields))
    return len(lines), (f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)).encode()


def build_shard(samples: list[Sample]) -> tuple[bytes, bytes]:
    """The tar bytes and the DALI index bytes, in memory."""
    buf = io.BytesIO()
    _, index = write_tar(buf, samples)
    return buf.getvalue(), index


def read_shard(tar_path: Path) -> list[Sample]:
    """The samples of a shard, in order; raises ValueError when members are missing, misordered or disagree."""
    with tarfile.open(tar_path) as tf:
        files = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    if len(files) % MEMBERS:
        raise ValueError(f"{len(files)} members, not a multiple of {MEMBERS}")
    samples = []
    for i in range(0, len(files), MEMBERS):
        group = files[i : i + MEMBERS]
        key = group[0][0].rsplit(".", 1)[0]
        label, path = struct.unpack("<i", group[2][1])[0], group[3][1].decode("utf-8", "surrogateescape")
        sample = Sample(key, group[0][1], label, path)
        if group != members(sample):
            raise ValueError(f"sample {key}: members {[n for n, _ in group]} do not match the contract")
        samples.append(sample)
    return samples


def write_shard(out: Path, stem: str, samples: Iterable[Sample]) -> ShardRecord | None:
    """Stream <stem>.tar, then <stem>.idx, into `out` (a present index implies a complete tar); None, and no files,
    when there are no samples."""
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return None
    tar, idx = out / f"{stem}.tar", out / f"{stem}.idx"
    with atomic_file(tar) as f:
        count, index = write_tar(f, itertools.chain([first], samples))
    atomic_write(idx, index)
    return ShardRecord(
        tar.name, idx.name, count, tar.stat().st_size, sha256_file(tar), hashlib.sha256(index).hexdigest()
    )
