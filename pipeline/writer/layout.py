"""Find an ImageNet-style source's splits, classes, names and labels (class folders, Kaggle or devkit val)."""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.writer.mat5 import MatError, synsets

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
    label: int
    key: str


@dataclass
class Source:
    root: Path
    classes: list[dict]
    layout: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[Entry]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)


def key_of(path: Path) -> str:
    """The sample key: the file's stem with '.' and whitespace replaced by '_' (tar and DALI index safe)."""
    return re.sub(r"[.\s]", "_", path.stem)


def find(root: Path, name: str, dirs=LABEL_DIRS) -> Path | None:
    return next((root / d / name for d in dirs if (root / d / name).exists()), None)


def split_dir(root: Path, split: str) -> Path | None:
    return next((root / d.format(split=split) for d in SPLIT_DIRS if (root / d.format(split=split)).is_dir()), None)


def class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan(root: Path, splits: list[str]) -> Source:
    """Every candidate file of the requested splits with its label; empty class folders and unlabelled files rejected."""
    dirs = {split: split_dir(root, split) for split in splits}
    for split, d in dirs.items():
        if d is None:
            raise LayoutError(f"{root}: no {split}/ folder (expected {root / split} or {root / SPLIT_DIRS[1].format(split=split)})")
    wnids = load_wnids(root, dirs)
    src = Source(root, [{"index": i, "wnid": w, "name": w} for i, w in enumerate(wnids)])
    index = {w: i for i, w in enumerate(wnids)}
    for split, d in dirs.items():
        if class_folders(d):
            src.layout[split] = "class_folders"
            entries = scan_class_folders(src, d, index)
        else:
            entries = scan_flat(src, split, d, index)
        src.samples[split] = dedupe(src, entries)
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
    raise LayoutError(f"{root}: no class folders in train/ and no {SYNSET_TXT}; add train/<wnid>/ folders or {SYNSET_TXT}")


def rel(src: Source, path: Path) -> str:
    return os.path.relpath(path, src.root)


def scan_class_folders(src: Source, folder: Path, index: dict[str, int]) -> list[Entry]:
    entries = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            src.rejected.append({"file": rel(src, p), "reason": "not in a class folder (no label)"})
    for wnid in class_folders(folder):
        if wnid not in index:
            raise LayoutError(f"{folder / wnid}: class not among the train classes; remove it or add train/{wnid}/")
        files = sorted(p for p in (folder / wnid).iterdir() if not p.is_dir())
        if not files:
            src.rejected.append({"file": rel(src, folder / wnid), "reason": "empty class folder"})
        entries += [Entry(p, index[wnid], key_of(p)) for p in files]
    return entries


def scan_flat(src: Source, split: str, folder: Path, index: dict[str, int]) -> list[Entry]:
    """A flat folder labelled by the Kaggle CSV, else by the devkit's ground truth + meta.mat."""
    files = sorted(p for p in folder.iterdir() if not p.is_dir())
    csv_path, truth = find(src.root, KAGGLE_CSV), find(src.root, DEVKIT_TRUTH)
    if csv_path:
        src.layout[split] = "flat_kaggle"
        labels, source = kaggle_labels(csv_path), csv_path.name
    elif truth:
        src.layout[split] = "flat_devkit"
        labels, source = devkit_labels(src.root, truth), truth.name
    else:
        raise LayoutError(f"{folder}: flat {split} folder without labels; put {KAGGLE_CSV} (Kaggle) or "
                          f"{DEVKIT_TRUTH} + {DEVKIT_META} (devkit) in {src.root}")
    entries = []
    for p in files:
        wnid = labels.get(p.stem)
        if wnid in index:
            entries.append(Entry(p, index[wnid], key_of(p)))
        else:
            reason = f"no label in {source}" if wnid is None else f"label {wnid} is not a train class"
            src.rejected.append({"file": rel(src, p), "reason": reason})
    return entries


def kaggle_labels(path: Path) -> dict[str, str]:
    """ImageId -> wnid, the first token of PredictionString."""
    with open(path, newline="") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f) if row["PredictionString"].strip()}


def devkit_labels(root: Path, truth: Path) -> dict[str, str]:
    """ILSVRC2012_val_%08d -> wnid: line n of the ground truth holds image n's ILSVRC2012_ID, meta.mat maps IDs to wnids."""
    meta = find(root, DEVKIT_META)
    if meta is None:
        raise LayoutError(f"{truth}: needs the devkit's {DEVKIT_META} beside it to map ILSVRC2012_IDs to wnids")
    try:
        ids = synsets(meta)
    except (MatError, OSError, KeyError, IndexError) as e:
        raise LayoutError(f"{meta}: unreadable ({e}); use the ILSVRC2012 devkit's data/{DEVKIT_META}") from None
    lines = truth.read_text().split()
    return {f"ILSVRC2012_val_{n:08d}": ids[int(i)][0] for n, i in enumerate(lines, start=1) if int(i) in ids}


def dedupe(src: Source, entries: list[Entry]) -> list[Entry]:
    """Keys must be unique within a split: keep the first file of each key (in path order), reject the rest."""
    seen, kept = {}, []
    for e in entries:
        if e.key in seen:
            src.rejected.append({"file": rel(src, e.path), "reason": f"same key {e.key} as {rel(src, seen[e.key])}"})
        else:
            seen[e.key] = e.path
            kept.append(e)
    return kept


def add_names(src: Source) -> None:
    """Human-readable names from LOC_synset_mapping.txt or the devkit's meta.mat, else the wnid."""
    names = {}
    mapping, meta = find(src.root, SYNSET_TXT), find(src.root, DEVKIT_META)
    if mapping:
        names = dict(line.split(maxsplit=1) for line in mapping.read_text().splitlines() if len(line.split()) > 1)
    elif meta:
        try:
            names = {w: words for w, words in synsets(meta).values()}
        except (MatError, OSError, KeyError, IndexError):
            names = {}
    for c in src.classes:
        c["name"] = names.get(c["wnid"], c["wnid"]).strip()
