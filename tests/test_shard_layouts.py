"""Every input layout: class-folder train, val flat (Kaggle CSV or devkit ground truth + meta.mat) or in class folders."""
import json
import shutil
from pathlib import PurePath

import pytest

from pipeline.writer.synthetic import make_dataset, wnid
from pipeline.writer.mat5 import read_mat, synsets, write_synsets
from tools.shard_imagenet import main
from pipeline.writer.tars import read_shard

ARGS = ["--resize", "short:32", "--workers", "1", "--shard-size", "10"]


def labels(shards, split) -> dict[str, int]:
    """Source file stem -> label, from the path each sample records (stems are unique in these sets)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    return {PurePath(s.path).stem: s.label for sh in manifest["splits"][split]["shards"]
            for s in read_shard(shards / sh["tar"])}


def shard(src, out, *extra) -> dict:
    assert main(["--src", str(src), "--out", str(out), *ARGS, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    def _make(val_layout):
        return make_dataset(tmp_path_factory.mktemp(val_layout), classes=3, per_class=4, val_per_class=3,
                            size_range=(40, 64), seed=7, val_layout=val_layout)
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
    assert [c["wnid"] for c in manifest["classes"]] == wnids and [c["index"] for c in manifest["classes"]] == [0, 1, 2, 3]
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
    assert labels(tmp_path / "out", "train") == {f"{c}.{i}": n for n, c in enumerate(("cats", "dogs")) for i in range(3)}
    assert {r["reason"] for r in manifest["repaired"]} == {"PNG file re-encoded as JPEG"}


@pytest.mark.parametrize("remove,named", [("LOC_val_solution.csv", "LOC_val_solution.csv"),
                                          ("meta.mat", "meta.mat")])
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


def test_mat5_reads_devkit_style_synsets_and_skips_non_leaves(tmp_path):
    write_synsets(tmp_path / "meta.mat", [(2, "n02119789", "kit fox, Vulpes macrotis", 0),
                                          (1, "n02100735", "English setter", 0), (1001, "n00001740", "entity", 2)])
    assert synsets(tmp_path / "meta.mat") == {2: ("n02119789", "kit fox, Vulpes macrotis"), 1: ("n02100735", "English setter")}
    table = read_mat(tmp_path / "meta.mat")["synsets"]
    assert [float(s["num_children"][0, 0]) for s in table] == [0.0, 0.0, 2.0] and table[0]["WNID"] == wnid(2119789)


@pytest.mark.parametrize("compress", [True, False])
def test_mat5_reads_what_scipy_writes(tmp_path, compress):
    import numpy as np
    import scipy.io as sio  # a test requirement only: the devkit reader itself does not need it
    rows = np.array([(5, "n01440764", "tench, Tinca tinca", 0), (1003, "n00001740", "entity", 7)],
                    dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    sio.savemat(tmp_path / "meta.mat", {"synsets": rows.reshape(2, 1)}, do_compression=compress)
    assert synsets(tmp_path / "meta.mat") == {5: ("n01440764", "tench, Tinca tinca")}


def test_mat5_reads_files_matlab_wrote():
    """scipy ships MAT files saved by MATLAB itself (v6 uncompressed, v7 compressed)."""
    from pathlib import Path

    import scipy.io as sio
    data = Path(sio.__file__).parent / "matlab" / "tests" / "data"
    files = [data / f"teststructarr_{v}_GLNX86.mat" for v in ("6.5.1", "7.4")]
    for f in files:
        one, two = read_mat(f)["teststructarr"]
        assert (int(one["one"][0, 0]), int(one["two"][0, 0]), two["one"], two["two"]) == (1, 2, "number 1", "number 2")


def test_val_image_without_a_label_row_is_rejected_not_guessed(kaggle, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(kaggle[0], src)
    lines = (src / "LOC_val_solution.csv").read_text().splitlines()
    (src / "LOC_val_solution.csv").write_text("\n".join(lines[:-1]) + "\n")
    manifest = shard(src, tmp_path / "out")
    missing = lines[-1].split(",")[0]
    assert manifest["rejected"] == [{"file": f"val/{missing}.JPEG", "reason": "no label in LOC_val_solution.csv"}]
    assert labels(tmp_path / "out", "val") == {k: v for k, v in labels(kaggle[1], "val").items() if k != missing}
