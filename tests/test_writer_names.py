"""Folders as people have them: camera names in every class, names a tar header cannot hold, subfolders, hidden
files. Every file ends up in the shards (once, its path recorded) or in the manifest's rejected list."""

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.writer.tars import read_shard
from tools.shard_imagenet import main

ARGS = ["--resize", "short:24", "--workers", "1", "--shard-size", "7", "--splits", "train"]
COLOURS = {"beach": "gold", "city": "grey", "forest": "green"}


def photo(path: Path | bytes, colour: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        Image.new("RGB", (48, 32), colour).save(f, "JPEG")


def every_file(src: Path) -> list[str]:
    """Every file under src/train, as os lists it, through symbolic links (what a user counts with find -L)."""
    return sorted(
        os.path.relpath(os.path.join(d, f), src)
        for d, _, files in os.walk(src / "train", followlinks=True)
        for f in files
    )


def shard(src: Path, out: Path) -> tuple[dict, list]:
    assert main(["--src", str(src), "--out", str(out), *ARGS]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [s for sh in manifest["splits"]["train"]["shards"] for s in read_shard(out / sh["tar"])]
    assert main(["--verify", str(out)]) == 0
    return manifest, samples


def accounted_once(src: Path, manifest: dict, samples: list) -> None:
    """Each file is written exactly once, rejected or skipped with a reason, and nothing else is in the shards."""
    written = Counter(s.path for s in samples)
    assert max(written.values()) == 1
    assert sorted([*written, *(r["file"] for r in manifest["rejected"] + manifest["skipped"])]) == every_file(src)


def test_camera_names_repeated_in_every_class_are_all_kept(tmp_path):
    src = tmp_path / "holidays"
    for place, colour in COLOURS.items():
        for i in range(1, 5):
            photo(src / "train" / place / f"IMG_{i:04d}.JPG", colour)
    manifest, samples = shard(src, tmp_path / "out")
    assert manifest["splits"]["train"]["count"] == 12 and manifest["rejected"] == []
    assert len({s.key for s in samples}) == 12
    assert all(re.fullmatch(r"train_\d{8}", s.key) for s in samples)
    classes = [c["wnid"] for c in manifest["classes"]]
    assert sorted((s.path, classes[s.label]) for s in samples) == sorted(
        (f"train/{place}/IMG_{i:04d}.JPG", place) for place in COLOURS for i in range(1, 5)
    )
    accounted_once(src, manifest, samples)


def test_keys_are_the_same_for_the_same_listing(tmp_path):
    src = tmp_path / "holidays"
    for place, colour in COLOURS.items():
        photo(src / "train" / place / "IMG_0001.JPG", colour)
    _, a = shard(src, tmp_path / "a")
    _, b = shard(src, tmp_path / "b")
    assert sorted((s.key, s.path) for s in a) == sorted((s.key, s.path) for s in b)


NAMES = [
    "é" * 120 + ".jpg",  # 241 bytes of UTF-8: over the tar header's 100
    "x" * 250 + ".jpg",  # the longest name ext4 allows
    os.fsdecode(b"caf\xe9 latin-1.jpg"),  # bytes that are not UTF-8, as old cameras and Windows zips write them
    "two.dots.and spaces.jpg",
    "colon: and # hash.jpg",
    "new\nline.jpg",
]


def test_any_name_the_filesystem_allows_is_sharded_and_recorded_exactly(tmp_path, capsys):
    src = tmp_path / "downloads"
    for name in NAMES:
        photo(os.fsencode(src / "train" / "misc") + b"/" + os.fsencode(name), "red")
    (src / "train" / "misc" / os.fsdecode(b"broken \xff.jpg")).write_bytes(b"not a JPEG")
    manifest, samples = shard(src, tmp_path / "out")
    assert sorted(os.fsencode(s.path) for s in samples) == sorted(b"train/misc/" + os.fsencode(n) for n in NAMES)
    assert all(re.fullmatch(r"train_\d{8}", s.key) for s in samples)
    assert manifest["rejected"] == [{"file": os.fsdecode(b"train/misc/broken \xff.jpg"), "reason": "not an image"}]
    out = capsys.readouterr().out
    assert "rejected: train/misc/broken \\udcff.jpg: not an image" in out  # printable, on one line
    accounted_once(src, manifest, samples)


def test_source_and_output_folders_whose_own_names_are_not_utf8(tmp_path, capsys):
    root = tmp_path / os.fsdecode(b"fotos \xe9t\xe9")
    photo(root / "src" / "train" / "misc" / "a.jpg", "red")
    _manifest, samples = shard(root / "src", root / "out")
    assert [s.path for s in samples] == ["train/misc/a.jpg"]
    assert capsys.readouterr().out.startswith("config:\n  src ")  # the name printed escaped, not raised on


@pytest.mark.timeout(60)  # fails instead of hanging the suite when the run blocks (on a FIFO, in a symbolic-link loop)
def test_images_in_subfolders_belong_to_their_class_and_nothing_is_skipped_unlisted(tmp_path):
    src = tmp_path / "photos"
    photo(src / "train" / "cats" / "a.jpg", "red")
    photo(src / "train" / "cats" / "2019" / "summer" / "b.jpg", "red")
    photo(src / "train" / "cats" / ".thumbnails" / "c.jpg", "red")  # inside a class: the class's, as ImageFolder
    photo(src / "train" / "dogs" / "d.jpg", "blue")
    (src / "train" / "dogs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    photo(src / "train" / ".ipynb_checkpoints" / "e.jpg", "blue")  # beside the classes: not a class
    (src / "train" / "dogs" / "old").symlink_to(src / "train" / "dogs")  # a loop must not hang or duplicate
    os.mkfifo(src / "train" / "dogs" / "pipe.jpg")  # reading it would block forever
    (src / "train" / "dogs" / "self.jpg").symlink_to("self.jpg")  # a link to itself: ELOOP on every look
    manifest, samples = shard(src, tmp_path / "out")
    assert [c["wnid"] for c in manifest["classes"]] == ["cats", "dogs"]
    assert sorted((s.path, s.label) for s in samples) == [
        ("train/cats/.thumbnails/c.jpg", 0),
        ("train/cats/2019/summer/b.jpg", 0),
        ("train/cats/a.jpg", 0),
        ("train/dogs/d.jpg", 1),
    ]
    assert {r["file"]: r["reason"] for r in manifest["rejected"]} == {
        "train/.ipynb_checkpoints/e.jpg": "in a hidden folder, not a class folder",
        "train/dogs/old": "folder already included through another path (symbolic link)",
        "train/dogs/pipe.jpg": "not a regular file",
        "train/dogs/self.jpg": "unreadable (Too many levels of symbolic links)",
    }
    assert manifest["skipped"] == [{"file": "train/dogs/.DS_Store", "reason": "hidden file"}]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_nested_camera_folder_accounts_for_every_file(tmp_path, workers):
    """The issue's folder at a larger scale, through worker processes: 3 classes x 2 albums x the same 5 names."""
    src = tmp_path / "camera"
    for place, colour in COLOURS.items():
        for album in ("2019", "2020"):
            for i in range(5):
                photo(src / "train" / place / album / f"DSC_{i:04d}.JPG", colour)
    (src / "train" / "city" / "2020" / "DSC_0003.JPG").write_bytes(b"")
    assert main(["--src", str(src), "--out", str(tmp_path / "out"), *ARGS, "--workers", workers]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    samples = [s for sh in manifest["splits"]["train"]["shards"] for s in read_shard(tmp_path / "out" / sh["tar"])]
    assert len(samples) == 29 and manifest["rejected"] == [
        {"file": "train/city/2020/DSC_0003.JPG", "reason": "empty file (0 bytes)"}
    ]
    accounted_once(src, manifest, samples)
