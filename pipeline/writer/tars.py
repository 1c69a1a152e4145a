"""Deterministic WebDataset tars with DALI index files, written atomically."""
from __future__ import annotations

import hashlib
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import atomic_write
from pipeline.manifest import CLS_EXT, IMAGE_EXT, LABEL_EXT, PATH_EXT

BLOCK = 512
RECORD = 20 * BLOCK  # tar pads the archive to whole records, as GNU tar and tarfile do
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
    return [(f"{sample.key}.{IMAGE_EXT}", sample.jpeg), (f"{sample.key}.{CLS_EXT}", str(sample.label).encode()),
            (f"{sample.key}.{LABEL_EXT}", struct.pack("<i", sample.label)),
            (f"{sample.key}.{PATH_EXT}", sample.path.encode("utf-8", "surrogateescape"))]


MEMBERS = 4  # len(members(sample))


# USTAR header fields around name and size, as tarfile writes them for mode 0644, owner 0:0 with no names, mtime 0
# (the checksum field as spaces while it is summed; owner names, device numbers and prefix are NULs).
_MODE_OWNER = b"0000644\0" + b"0000000\0" * 2
_AFTER_SIZE = b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + tarfile.POSIX_MAGIC


def header(name: str, size: int) -> bytes:
    """A USTAR header with nothing that varies between runs: tarfile's bytes, built directly (the sharder's parent
    process writes four per image, and TarInfo.tobuf took most of its time per image)."""
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8 ** 11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a USTAR header")
    block = (raw.ljust(100, b"\0") + _MODE_OWNER + b"%011o\0" % size + _AFTER_SIZE).ljust(BLOCK, b"\0")
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def build_shard(samples: list[Sample]) -> tuple[bytes, bytes]:
    """The tar bytes and the DALI index bytes (one line per sample: ext offset size name, per member)."""
    parts, lines, offset = [], [], 0
    for sample in samples:
        fields = []
        for name, data in members(sample):
            parts += [header(name, len(data)), data, b"\0" * (-len(data) % BLOCK)]
            fields.append(f"{name.split('.', 1)[1]} {offset + BLOCK} {len(data)} {name}")
            offset += BLOCK + len(data) + (-len(data) % BLOCK)
        lines.append(" ".join(fields))
    end = offset + 2 * BLOCK
    parts.append(b"\0" * (2 * BLOCK + (-end % RECORD)))
    index = f"{INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)
    return b"".join(parts), index.encode()


def read_shard(tar_path: Path) -> list[Sample]:
    """The samples of a shard, in order; raises ValueError when members are missing, misordered or disagree."""
    with tarfile.open(tar_path) as tf:
        files = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    if len(files) % MEMBERS:
        raise ValueError(f"{len(files)} members, not a multiple of {MEMBERS}")
    samples = []
    for i in range(0, len(files), MEMBERS):
        group = files[i:i + MEMBERS]
        key = group[0][0].rsplit(".", 1)[0]
        label, path = struct.unpack("<i", group[2][1])[0], group[3][1].decode("utf-8", "surrogateescape")
        sample = Sample(key, group[0][1], label, path)
        if group != members(sample):
            raise ValueError(f"sample {key}: members {[n for n, _ in group]} do not match the contract")
        samples.append(sample)
    return samples


def write_shard(out: Path, stem: str, samples: list[Sample]) -> ShardRecord:
    """Write <stem>.tar and <stem>.idx into `out`, index after tar so a present index implies a complete tar."""
    tar, index = build_shard(samples)
    atomic_write(out / f"{stem}.tar", tar)
    atomic_write(out / f"{stem}.idx", index)
    return ShardRecord(f"{stem}.tar", f"{stem}.idx", len(samples), len(tar),
                       hashlib.sha256(tar).hexdigest(), hashlib.sha256(index).hexdigest())
