"""Symbolic links in a source folder are resolved across the whole tree: every file is written once, under the class
whose folder really holds it, and whatever a link leads to twice is listed with the reason."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.writer.tars import read_shard
from tools.shard_imagenet import main

ARGS = ["--resize", "short:24", "--workers", "1", "--shard-size", "5"]
COLOURS = {"a": "red", "b": "green", "c": "blue"}


def photo(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), colour).save(path, "JPEG")


def classes(src: Path) -> Path:
    for wnid, colour in COLOURS.items():
        for i in range(3):
            photo(src / "train" / wnid / f"{wnid}{i}.jpg", colour)
    return src


def shard(src: Path, out: Path, *extra: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """The manifest, and each sample as (the path it was read at, the real file, its class)."""
    assert main(["--src", str(src), "--out", str(out), *ARGS, *extra]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    wnids = [c["wnid"] for c in manifest["classes"]]
    samples = [
        (s.path, os.path.realpath(src / s.path), wnids[s.label])
        for split in manifest["splits"].values()
        for sh in split["shards"]
        for s in read_shard(out / sh["tar"])
    ]
    return manifest, samples


def real_files(src: Path) -> dict[str, str]:
    """Independent reference: every image file that really is in a class folder (links not followed) -> its class."""
    return {
        os.path.realpath(os.path.join(d, f)): os.path.relpath(d, src / "train").split(os.sep)[0]
        for d, _, files in os.walk(src / "train")
        for f in files
        if not os.path.islink(os.path.join(d, f))
    }


def written_once_under_their_own_class(src: Path, samples) -> None:
    reals = Counter(real for _, real, _ in samples)
    assert max(reals.values()) == 1, reals.most_common(3)
    assert {real: wnid for _, real, wnid in samples} == real_files(src)


def rejected(manifest) -> dict[str, str]:
    return {r["file"]: r["reason"] for r in manifest["rejected"]}


@pytest.mark.timeout(60)
def test_a_link_back_up_the_tree_brings_no_other_class_in(tmp_path):
    src = classes(tmp_path / "src")
    (src / "train" / "b" / "up").symlink_to("..")  # train/b/up/a/* would be class a's images labelled b
    (src / "train" / "c" / "root").symlink_to(src)  # the whole source again, from inside class c
    manifest, samples = shard(src, tmp_path / "out", "--splits", "train")
    written_once_under_their_own_class(src, samples)
    assert manifest["splits"]["train"]["count"] == 9
    why = rejected(manifest)
    assert set(why) == {"train/b/up", "train/c/root"}
    assert "holds class folders" in why["train/b/up"] and "holds class folders" in why["train/c/root"]
    assert main(["--verify", str(tmp_path / "out")]) == 0


def test_a_class_folder_that_is_a_link_to_another_class_has_no_images_of_its_own(tmp_path, capsys):
    src = classes(tmp_path / "src")
    (src / "train" / "d").symlink_to("a")
    manifest, samples = shard(src, tmp_path / "out", "--splits", "train")
    written_once_under_their_own_class(src, samples)
    assert [c["wnid"] for c in manifest["classes"]] == ["a", "b", "c", "d"]
    assert "another class's folder" in rejected(manifest)["train/d"] and "train/a" in rejected(manifest)["train/d"]
    assert manifest["empty_classes"] == ["train/d"]
    assert "class folder train/d has no usable image" in capsys.readouterr().err


def test_file_links_and_folders_outside_the_tree_are_written_once(tmp_path):
    src = classes(tmp_path / "src")
    photo(tmp_path / "elsewhere" / "e.jpg", "white")  # out of the tree: its first path is the one written
    (src / "train" / "b" / "more").symlink_to(tmp_path / "elsewhere")
    (src / "train" / "c" / "more").symlink_to(tmp_path / "elsewhere")
    (src / "train" / "c" / "e.jpg").symlink_to(tmp_path / "elsewhere" / "e.jpg")
    (src / "train" / "c" / "a0.jpg").symlink_to(src / "train" / "a" / "a0.jpg")  # a file of class a
    manifest, samples = shard(src, tmp_path / "out", "--splits", "train")
    assert Counter(real for _, real, _ in samples).most_common(1)[0][1] == 1
    assert [(path, wnid) for path, real, wnid in samples if "elsewhere" in real] == [("train/b/more/e.jpg", "b")]
    assert {path: real_files(src)[real] for path, real, _ in samples if "elsewhere" not in real} == {
        f"train/{w}/{w}{i}.jpg": w for w in COLOURS for i in range(3)
    }
    assert set(rejected(manifest)) == {"train/c/more", "train/c/e.jpg", "train/c/a0.jpg"}


def test_val_links_into_train_are_not_val_samples(tmp_path):
    src = classes(tmp_path / "src")
    photo(src / "val" / "a" / "v.jpg", "red")
    (src / "val" / "b").mkdir()
    (src / "val" / "b" / "b0.jpg").symlink_to(src / "train" / "b" / "b0.jpg")  # a training image scored in val
    manifest, samples = shard(src, tmp_path / "out")
    assert sorted(path for path, _, _ in samples if path.startswith("val/")) == ["val/a/v.jpg"]
    assert "train/b/b0.jpg" in rejected(manifest)["val/b/b0.jpg"]


def test_hidden_folders_are_listed_file_by_file_and_a_hidden_link_to_a_class_takes_nothing_from_it(tmp_path):
    src = classes(tmp_path / "src")
    (src / "train" / ".backup").symlink_to("a")  # walked first (sorted), it must not claim class a's folder
    photo(src / "val" / "x.JPEG", "red")  # a flat val folder, labelled by the Kaggle CSV
    photo(src / "val" / ".thumbs" / "x.JPEG", "red")
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nx,a 1 2 3 4\n")
    manifest, samples = shard(src, tmp_path / "out")
    written_once_under_their_own_class(src, [s for s in samples if s[0].startswith("train/")])
    assert [(path, wnid) for path, _, wnid in samples if path.startswith("val/")] == [("val/x.JPEG", "a")]
    why = rejected(manifest)
    assert why["val/.thumbs/x.JPEG"] == "in a hidden folder, not a class folder"
    assert "train/a" in why["train/.backup"] and set(why) == {"train/.backup", "val/.thumbs/x.JPEG"}


@pytest.mark.timeout(60)
def test_a_link_loop_at_class_level_is_listed_and_the_rest_written(tmp_path):
    src = classes(tmp_path / "src")
    (src / "train" / "zz").symlink_to("zz")
    (src / "train" / "x").symlink_to("y")
    (src / "train" / "y").symlink_to("x")
    manifest, samples = shard(src, tmp_path / "out", "--splits", "train")
    written_once_under_their_own_class(src, samples)
    assert [c["wnid"] for c in manifest["classes"]] == ["a", "b", "c"]
    loop = "unreadable (Too many levels of symbolic links)"
    assert rejected(manifest) == {"train/x": loop, "train/y": loop, "train/zz": loop}
