"""The shard folder's contract: manifest.json as tools/shard_imagenet.py writes it, read and checked here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # 2: positional sample keys and a .path member
MANIFEST = "manifest.json"
# Members of every sample in a shard: the JPEG, the WebDataset ASCII label, the same label as a little-endian int32
# that DALI's webdataset reader takes with dtypes=INT32 and no parsing, and the source file's path relative to --src.
IMAGE_EXT, CLS_EXT, LABEL_EXT, PATH_EXT = "jpg", "cls", "lbl", "path"
FIX_HINT = "run tools/shard_imagenet.py --verify {dir} (or re-shard with tools/shard_imagenet.py --src ... --out {dir})"
RESHARD_HINT = "re-shard with tools/shard_imagenet.py --src ... --out {dir}"
# The manifest's checksum of its own content: the statistics the loaders normalise with are checked like the shards.
# Manifests written before it have none; they are read as they are.
CHECKSUM = "manifest_sha256"


class ShardError(Exception):
    """A shard folder that cannot be used; the message is one line naming the file and the fix."""


class UnreadableShard(ShardError):
    """A shard file this process may not read: its permissions are the fault, not its bytes."""


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    count: int
    tar_bytes: int
    tar_sha256: str
    index_sha256: str


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: list[dict]
    splits: dict[str, list[Shard]]
    rgb_mean: np.ndarray  # (3,), 0-255 pixel units (paper §2: subtract the mean activity)
    rgb_std: np.ndarray  # (3,), 0-255 pixel units
    eigval: np.ndarray  # (3,), covariance eigenvalues of RGB scaled to [0, 1] (paper §4.1)
    eigvec: np.ndarray  # (3, 3), column i is eigenvector p_i
    min_side: dict[str, int | None]  # per split, the shortest side of its images; None for an empty split
    raw: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        return sum(s.count for s in self.shards(split))

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits or not self.splits[split]:
            raise ShardError(f"{self.root / MANIFEST}: no '{split}' shards; re-shard with --splits including {split}")
        return self.splits[split]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_sha256(raw: dict) -> str:
    """sha256 of a manifest's content, its own checksum left out, in one canonical JSON form."""
    body = {k: v for k, v in raw.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(raw: dict) -> dict:
    """The manifest with its own checksum."""
    return {**raw, CHECKSUM: content_sha256(raw)}


def load_manifest(
    shards_dir: str | Path, checksums: bool = False, check_shards: bool = True, fix: str = FIX_HINT
) -> Manifest:
    """Read DIR/manifest.json and check every shard and index it names: present, index intact (tars too, with
    checksums). Once per run: the loaders take the Manifest. --verify passes check_shards=False and checks each shard
    itself, to name every damaged one, and its own `fix`."""
    root = Path(shards_dir)
    hint = fix.format(dir=root)
    if not root.is_dir():
        raise ShardError(f"{root}: no such shard folder; run tools/shard_imagenet.py --src IMAGENET --out {root} first")
    path = root / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: missing; run tools/shard_imagenet.py --src IMAGENET --out {root} first")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable ({e}); {hint}") from None
    if not isinstance(raw, dict):
        raise ShardError(f"{path}: holds a JSON {type(raw).__name__}, not a manifest; {hint}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            f"re-shard with tools/shard_imagenet.py"
        )
    try:
        return _parse(root, raw, checksums if check_shards else None, hint)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: malformed ({type(e).__name__}: {e}); {hint}") from None


def _parse(root: Path, raw: dict, checksums: bool | None, hint: str) -> Manifest:
    splits, min_side = {}, {}
    for split, entry in raw["splits"].items():
        shards = []
        for s in entry["shards"]:
            shard = Shard(
                root / s["tar"],
                root / s["index"],
                int(s["count"]),
                int(s["tar_bytes"]),
                s["tar_sha256"],
                s["index_sha256"],
            )
            if checksums is not None:
                check_shard(shard, checksums, hint)
            shards.append(shard)
        if sum(s.count for s in shards) != entry["count"]:
            raise ShardError(f"{root / MANIFEST}: '{split}' shard counts do not add up to {entry['count']}; {hint}")
        splits[split] = shards
        min_side[split] = None if entry["min_side"] is None else int(entry["min_side"])
    stats = raw["stats"]
    return Manifest(
        root=root,
        classes=raw["classes"],
        splits=splits,
        rgb_mean=np.asarray(stats["rgb_mean"], np.float64),
        rgb_std=np.asarray(stats["rgb_std"], np.float64),
        eigval=np.asarray(stats["eigval"], np.float64),
        eigvec=np.asarray(stats["eigvec"], np.float64),
        min_side=min_side,
        raw=raw,
    )


def check_crop(manifest: Manifest, split: str, crop_size: int) -> None:
    """Refuse a crop larger than the split's smallest image up front, rather than fail (or pad) mid-run."""
    manifest.shards(split)
    side = manifest.min_side[split]
    if side is not None and crop_size > side:
        raise ShardError(
            f"{manifest.root / MANIFEST}: the smallest '{split}' image has a short side of {side}, "
            f"smaller than crop_size {crop_size}; pass a smaller --crop-size, or re-shard with "
            f"tools/shard_imagenet.py --resize short:{crop_size}"
        )


def check_shard(shard: Shard, checksums: bool, hint: str) -> None:
    for f in (shard.tar, shard.index):
        if not f.is_file():
            raise ShardError(f"{f}: missing; {hint}")
    if shard.tar.stat().st_size != shard.tar_bytes:
        raise ShardError(f"{shard.tar}: {shard.tar.stat().st_size} bytes, manifest says {shard.tar_bytes}; {hint}")
    # Index files are small, so they are always checked; tars (hundreds of MB each) only when asked.
    pairs = [(shard.index, shard.index_sha256)]
    if checksums:
        pairs.append((shard.tar, shard.tar_sha256))
    for f, want in pairs:
        try:
            digest = sha256_file(f)
        except OSError as e:
            raise UnreadableShard(
                f"{f}: cannot read ({e.strerror}); make the shard folder readable (chmod -R u+rX) and rerun"
            ) from None
        if digest != want:
            raise ShardError(f"{f}: checksum does not match the manifest; {hint}")
