"""Every input layout: class-folder train; val flat (Kaggle CSV or devkit ground truth + meta.mat) or in folders."""

import json
import shutil
from pathlib import PurePath

import numpy as np
import pytest
import scipy.io as sio

from pipeline.synthetic import make_dataset
from pipeline.writer.devkit import synsets, write_synsets
from pipeline.writer.tars import read_shard
from tools.shard_imagenet import main

ARGS = ["--resize", "short:32", "--workers", "1", "--shard-size", "10"]


def labels(shards, split) -> dict[str, int]:
    """Source file stem -> label, from the path each sample records (stems are unique in these sets)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    return {
        PurePath(s.path).stem: s.label
        for sh in manifest["splits"][split]["shards"]
        for s in read_shard(shards / sh["tar"])
    }


def shard(src, out, *extra) -> dict:
    assert main(["--src", str(src), "--out", str(out), *ARGS, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    def _make(val_layout):
        return make_dataset(
            tmp_path_factory.mktemp(val_layout),
            classes=3,
            per_class=4,
            val_per_class=3,
            size_range=(40, 64),
            seed=7,
            val_layout=val_layout,
        )

    return _make


@pytest.fixture(scope="module")
def kaggle(make, tmp_path_factory):
    src = make("kaggle")
    out = tmp_path_factory.mktemp("kaggle_shards")
    return src, out, shard(src, out)


def test_train_labels_are_sorted_wnid_positions_and_names_come_from_the_mapping(demo_src, demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert manifest["layout"] == {"train": "class_folders", "val": "flat_kaggle"}
    wnids = sorted(p.name for p in (demo_src / "train").iterdir())
    assert [c["wnid"] for c in manifest["classes"]] == wnids and [c["index"] for c in manifest["classes"]] == [
        0,
        1,
        2,
        3,
    ]
    mapping = dict(line.split(" ", 1) for line in (demo_src / "LOC_synset_mapping.txt").read_text().splitlines())
    assert [c["name"] for c in manifest["classes"]] == [mapping[w] for w in wnids]
    expected = {p.stem: wnids.index(p.parent.name) for p in (demo_src / "train").glob("*/*")}
    assert labels(demo_shards, "train") == expected


def test_kaggle_val_labels_come_from_the_first_prediction_token(demo_src, demo_shards):
    rows = [line.split(",") for line in (demo_src / "LOC_val_solution.csv").read_text().splitlines()[1:]]
    wnids = [c["wnid"] for c in json.loads((demo_shards / "manifest.json").read_text())["classes"]]
    assert labels(demo_shards, "val") == {image: wnids.index(pred.split()[0]) for image, pred in rows}


def test_shards_are_shuffled_across_classes(demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    for sh in manifest["splits"]["train"]["shards"]:
        assert len({s.label for s in read_shard(demo_shards / sh["tar"])}) == 4


def test_devkit_val_gives_the_same_labels_as_kaggle(make, kaggle, tmp_path):
    """Same seed, same images: the devkit's ILSVRC2012_IDs (a shuffled order) must map to the same classes."""
    src = make("devkit")
    assert not (src / "LOC_synset_mapping.txt").exists()  # names must come from meta.mat
    manifest = shard(src, tmp_path)
    assert manifest["layout"]["val"] == "flat_devkit"
    assert labels(tmp_path, "val") == labels(kaggle[1], "val")
    assert [c["name"] for c in manifest["classes"]] == [c["name"] for c in kaggle[2]["classes"]]


def test_val_in_class_folders(make, kaggle, tmp_path):
    manifest = shard(make("folders"), tmp_path)
    assert manifest["layout"] == {"train": "class_folders", "val": "class_folders"}
    assert labels(tmp_path, "val") == labels(kaggle[1], "val")


def test_kaggle_download_layout_is_found(kaggle, tmp_path):
    src = tmp_path / "imagenet-object-localization-challenge"
    shutil.copytree(kaggle[0], src / "ILSVRC" / "Data" / "CLS-LOC")
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.move(src / "ILSVRC" / "Data" / "CLS-LOC" / name, src / name)
    shard(src, tmp_path / "out")
    assert labels(tmp_path / "out", "val") == labels(kaggle[1], "val")
    assert labels(tmp_path / "out", "train") == labels(kaggle[1], "train")


def test_any_folder_of_class_folders_works(tmp_path):
    from PIL import Image

    for cls, colour in (("cats", "red"), ("dogs", "blue")):
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (50, 40), colour).save(tmp_path / "src" / "train" / cls / f"{cls}.{i}.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "src" / "train" / "stray.jpg")
    manifest = shard(tmp_path / "src", tmp_path / "out", "--splits", "train")
    assert [(c["wnid"], c["name"]) for c in manifest["classes"]] == [("cats", "cats"), ("dogs", "dogs")]
    assert manifest["rejected"] == [{"file": "train/stray.jpg", "reason": "not in a class folder (no label)"}]
    assert labels(tmp_path / "out", "train") == {
        f"{c}.{i}": n for n, c in enumerate(("cats", "dogs")) for i in range(3)
    }
    assert {r["reason"] for r in manifest["repaired"]} == {"PNG file re-encoded as JPEG"}


@pytest.mark.parametrize("remove,named", [("LOC_val_solution.csv", "LOC_val_solution.csv"), ("meta.mat", "meta.mat")])
def test_missing_val_labels_fail_with_one_line_naming_the_file(make, tmp_path, capsys, remove, named):
    src = make("kaggle" if remove.endswith("csv") else "devkit")
    victim = next(src.rglob(remove))
    shutil.move(victim, tmp_path / remove)
    try:
        assert main(["--src", str(src), "--out", str(tmp_path / "out"), *ARGS]) == 2
    finally:
        shutil.move(tmp_path / remove, victim)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err


def test_meta_mat_written_for_synthetic_data_reads_back_in_scipy_and_skips_non_leaves(tmp_path):
    write_synsets(
        tmp_path / "meta.mat",
        [
            (2, "n02119789", "kit fox, Vulpes macrotis", 0),
            (1, "n02100735", "English setter", 0),
            (1001, "n00001740", "entity", 2),
        ],
    )
    assert synsets(tmp_path / "meta.mat") == {
        2: ("n02119789", "kit fox, Vulpes macrotis"),
        1: ("n02100735", "English setter"),
    }
    table = sio.loadmat(tmp_path / "meta.mat")["synsets"]  # the layout MATLAB gives: a 3x1 struct array
    assert table.shape == (3, 1) and [str(w[0]) for w in table["WNID"][:, 0]] == ["n02119789", "n02100735", "n00001740"]


def test_meta_mat_with_every_devkit_field_reads_as_torchvision_would(tmp_path):
    """The real file's struct has eight fields, children as arrays and one row per synset (1860 in all)."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = np.array(
        [
            (1, "n02119789", "kit fox", "a small fox", 0, np.zeros((1, 0)), 0, 1300),
            (2, "n02100735", "English setter", "a setter", 0, np.zeros((1, 0)), 0, 1300),
            (1001, "n00001740", "entity", "that which exists", 2, np.array([[1, 2]]), 19, 2600),
        ],
        dtype=[(f, "O") for f in fields],
    )
    sio.savemat(tmp_path / "meta.mat", {"synsets": rows.reshape(-1, 1)})
    meta = sio.loadmat(tmp_path / "meta.mat", squeeze_me=True)["synsets"]  # torchvision's parse_meta_mat, verbatim
    leaves = [meta[i] for i, n in enumerate(meta["num_children"]) if n == 0]
    expected = {int(s["ILSVRC2012_ID"]): (s["WNID"], s["words"]) for s in leaves}
    assert synsets(tmp_path / "meta.mat") == expected
    assert expected == {1: ("n02119789", "kit fox"), 2: ("n02100735", "English setter")}


@pytest.mark.parametrize("content", [b"not a MAT file at all", b""])
def test_unreadable_meta_mat_is_one_line_naming_it(make, tmp_path, capsys, content):
    src = tmp_path / "src"
    shutil.copytree(make("devkit"), src)
    meta = src / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.write_bytes(content)
    assert main(["--src", str(src), "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(meta) in err and "Traceback" not in err


def test_val_image_without_a_label_row_is_rejected_not_guessed(kaggle, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(kaggle[0], src)
    lines = (src / "LOC_val_solution.csv").read_text().splitlines()
    (src / "LOC_val_solution.csv").write_text("\n".join(lines[:-1]) + "\n")
    manifest = shard(src, tmp_path / "out")
    missing = lines[-1].split(",")[0]
    assert manifest["rejected"] == [{"file": f"val/{missing}.JPEG", "reason": "no label in LOC_val_solution.csv"}]
    assert labels(tmp_path / "out", "val") == {k: v for k, v in labels(kaggle[1], "val").items() if k != missing}
