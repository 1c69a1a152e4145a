"""Find an ImageNet-style source's splits, classes, names and labels (class folders, Kaggle or devkit val)."""

from __future__ import annotations

import csv
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.writer.devkit import DevkitError, synsets
from pipeline.writer.walk import is_dir, listing, reject_hidden, taken, walk

# Where each split's images live: <src>/<split>, or the Kaggle download's ILSVRC/Data/CLS-LOC/<split>.
SPLIT_DIRS = ("{split}", "ILSVRC/Data/CLS-LOC/{split}")
# Where label files live: the source root, or the devkit's data folder.
LABEL_DIRS = (".", "ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12", "devkit/data")
KAGGLE_CSV, SYNSET_TXT = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
DEVKIT_TRUTH, DEVKIT_META = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"


class LayoutError(Exception):
    """The source cannot be sharded as it is; the message is one line naming what is missing."""


@dataclass(frozen=True)
class Entry:
    path: Path
    rel: str  # relative to the source root, as os gives it (bytes that are not UTF-8 surrogate-escaped)
    label: int
    size: int
    mtime_ns: int


@dataclass
class Source:
    root: Path
    classes: list[dict]
    layout: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[Entry]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # files that are not images: not samples, not rejections
    folders: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # per split: (wnid, folder) found
    warnings: list[str] = field(default_factory=list)  # one line each, printed by the program
    # Links are resolved across the whole tree: each class folder (each flat split folder) by its real path owns what
    # it really holds; a link elsewhere into the tree is rejected where it stands, the target written where it is.
    owners: dict[str, str] = field(default_factory=dict)  # real path -> the owning folder, relative to the root
    seen: set[tuple[int, int]] = field(default_factory=set)  # (st_dev, st_ino) of every folder walked
    linked: dict[tuple[int, int], str] = field(default_factory=dict)  # files reached through links out of the tree

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"file": os.path.relpath(path, self.root), "reason": reason})

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"file": os.path.relpath(path, self.root), "reason": reason})

    def entry(self, path: str, st: os.stat_result, label: int) -> Entry:
        # Every path the scan finds starts with the root, so slicing gives what os.path.relpath would, ten times faster.
        return Entry(Path(path), path[len(os.path.join(self.root, "")) :], label, st.st_size, st.st_mtime_ns)

    def holder(self, real: str) -> str | None:
        """The owning folder (class folder, flat split folder) that really holds the real path `real`, if any."""
        while real not in self.owners:
            parent = os.path.dirname(real)
            if parent == real:
                return None
            real = parent
        return self.owners[real]

    def named(self, real: str) -> str:
        rel = os.path.relpath(real, self.root)
        return real if rel.startswith("..") or rel == "." else rel


def find(root: Path, name: str, dirs=LABEL_DIRS) -> Path | None:
    return next((root / d / name for d in dirs if (root / d / name).exists()), None)


def split_dir(root: Path, split: str) -> Path | None:
    return next((root / d.format(split=split) for d in SPLIT_DIRS if (root / d.format(split=split)).is_dir()), None)


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if is_dir(e) and not e.name.startswith("."))


def scan(root: Path, splits: list[str]) -> Source:
    """Every candidate file of the requested splits with its label; what cannot be a sample is listed as rejected."""
    try:
        return scan_splits(root, splits)
    except OSError as e:  # a folder or label file we may not read: refuse now rather than drop a class unseen
        raise LayoutError(
            f"{e.filename or root}: cannot read ({e.strerror}); make it readable (chmod -R u+rX) "
            f"or move it out of --src"
        ) from None


def scan_splits(root: Path, splits: list[str]) -> Source:
    dirs = {split: split_dir(root, split) for split in splits}
    for split, d in dirs.items():
        if d is None:
            raise LayoutError(
                f"{root}: no {split}/ folder (expected {root / split} or {root / SPLIT_DIRS[1].format(split=split)})"
            )
    wnids = load_wnids(root, dirs)
    src = Source(root, [{"index": i, "wnid": w, "name": w} for i, w in enumerate(wnids)])
    for d in dirs.values():
        for owner in [d / c for c in class_folders(d)] or [d]:
            src.owners.setdefault(os.path.realpath(owner), os.path.relpath(owner, root))
    src.warnings += normalisation_twins(wnids)
    index = {w: i for i, w in enumerate(wnids)}
    for split, d in dirs.items():
        if class_folders(d):
            src.layout[split] = "class_folders"
            src.samples[split] = scan_class_folders(src, split, d, index)
        else:
            src.samples[split] = scan_flat(src, split, d, index)
    add_names(src)
    return src


def load_wnids(root: Path, dirs: dict[str, Path]) -> list[str]:
    """Class list = sorted wnids of the train class folders (the torchvision/timm index convention)."""
    train = dirs.get("train") or split_dir(root, "train")
    for d in (train, *dirs.values()):
        if d is not None and class_folders(d):
            return class_folders(d)
    mapping = find(root, SYNSET_TXT)
    if mapping:
        return sorted(line.split()[0] for line in mapping.read_text().splitlines() if line.strip())
    raise LayoutError(
        f"{root}: no class folders in train/ and no {SYNSET_TXT}; add train/<wnid>/ folders or {SYNSET_TXT}"
    )


def scan_class_folders(src: Source, split: str, folder: Path, index: dict[str, int]) -> list[Entry]:
    files, dirs = listing(src, os.fspath(folder))
    for p, _, _ in files:
        src.reject(p, "not in a class folder (no label)")
    dirs = [d for d, _ in dirs]
    hidden = [d for d in dirs if os.path.basename(d).startswith(".")]
    reject_hidden(src, hidden)
    entries = []
    for d in dirs:
        wnid = os.path.basename(d)
        if d in hidden:
            continue
        if wnid not in index:
            raise LayoutError(f"{d}: class not among the train classes; remove it or add train/{wnid}/")
        src.folders.setdefault(split, []).append((wnid, os.path.relpath(d, src.root)))
        entries += [src.entry(p, st, index[wnid]) for p, st in walk(src, d, os.path.relpath(d, src.root))]
    return entries


def normalisation_twins(wnids: list[str]) -> list[str]:
    """A warning for each set of class names that differ only in Unicode normalisation (café typed on macOS is NFD):
    they look the same and are two classes."""
    same = Counter(unicodedata.normalize("NFC", w) for w in wnids)
    return [
        f"class folders {', '.join(ascii(w) for w in wnids if unicodedata.normalize('NFC', w) == n)} differ only "
        f"in Unicode normalisation (NFC vs NFD): they are {k} classes; rename them to one form (NFC)"
        for n, k in same.items()
        if k > 1
    ]


def empty_classes(src: Source, rejected: set[str]) -> list[str]:
    """Each class folder (relative to the root) without a usable image: none found, or every one rejected."""
    usable = Counter(
        (split, e.label) for split, entries in src.samples.items() for e in entries if e.rel not in rejected
    )
    index = {c["wnid"]: c["index"] for c in src.classes}
    return [rel for split, found in src.folders.items() for w, rel in found if not usable[(split, index[w])]]


def scan_flat(src: Source, split: str, folder: Path, index: dict[str, int]) -> list[Entry]:
    """A flat folder labelled by the Kaggle CSV, else by the devkit's ground truth + meta.mat."""
    files, hidden = listing(src, os.fspath(folder))  # no class folders here, so every folder is a hidden one
    reject_hidden(src, [d for d, _ in hidden])
    files = [(p, st) for p, st, link in files if taken(src, p, st, link, False)]
    csv_path, truth = find(src.root, KAGGLE_CSV), find(src.root, DEVKIT_TRUTH)
    if csv_path:
        src.layout[split] = "flat_kaggle"
        labels, source = kaggle_labels(csv_path), csv_path.name
    elif truth:
        src.layout[split] = "flat_devkit"
        labels, source = devkit_labels(src.root, truth), truth.name
    else:
        raise LayoutError(
            f"{folder}: flat {split} folder without labels; put {KAGGLE_CSV} (Kaggle) or "
            f"{DEVKIT_TRUTH} + {DEVKIT_META} (devkit) in {src.root}"
        )
    entries = []
    for p, st in files:
        wnid = labels.get(os.path.splitext(os.path.basename(p))[0])
        if wnid in index:
            entries.append(src.entry(p, st, index[wnid]))
        else:
            src.reject(p, f"no label in {source}" if wnid is None else f"label {wnid} is not a train class")
    return entries


def kaggle_labels(path: Path) -> dict[str, str]:
    """ImageId -> wnid, the first token of PredictionString."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet programs save a byte-order mark
        rows = list(csv.DictReader(f))
    if rows and not {"ImageId", "PredictionString"} <= rows[0].keys():
        raise LayoutError(f"{path}: no ImageId,PredictionString header; use the Kaggle file as downloaded")
    return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows if (r["PredictionString"] or "").strip()}


def devkit_labels(root: Path, truth: Path) -> dict[str, str]:
    """ILSVRC2012_val_%08d -> wnid: ground-truth line n holds image n's ILSVRC2012_ID, meta.mat maps IDs to wnids."""
    meta = find(root, DEVKIT_META)
    if meta is None:
        raise LayoutError(f"{truth}: needs the devkit's {DEVKIT_META} beside it to map ILSVRC2012_IDs to wnids")
    try:
        ids = synsets(meta)
    except (DevkitError, OSError) as e:
        raise LayoutError(f"{meta}: unreadable ({e}); use the ILSVRC2012 devkit's data/{DEVKIT_META}") from None
    lines = truth.read_text().split()
    return {f"ILSVRC2012_val_{n:08d}": ids[int(i)][0] for n, i in enumerate(lines, start=1) if int(i) in ids}


def add_names(src: Source) -> None:
    """Human-readable names from LOC_synset_mapping.txt or the devkit's meta.mat, else the wnid."""
    names = {}
    mapping, meta = find(src.root, SYNSET_TXT), find(src.root, DEVKIT_META)
    if mapping:
        names = dict(line.split(maxsplit=1) for line in mapping.read_text().splitlines() if len(line.split()) > 1)
    elif meta:
        try:
            names = {w: words for w, words in synsets(meta).values()}
        except (DevkitError, OSError):
            names = {}
    for c in src.classes:
        c["name"] = names.get(c["wnid"], c["wnid"]).strip()
