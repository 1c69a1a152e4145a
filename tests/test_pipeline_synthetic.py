"""Synthetic ImageNet: layout, determinism, sizes, learnable class cues, quirks, CLI."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import QUIRKS, class_look, make_dataset, wnid
from pipeline.writer.devkit import synsets
from tools.make_demo_data import main


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_labels(tmp_path):
    out = make_dataset(tmp_path / "d", classes=3, per_class=4, val_per_class=2, size_range=(60, 90), seed=1)
    assert sorted(p.name for p in (out / "train").iterdir()) == [wnid(k) for k in range(3)]
    assert all(len(list((out / "train" / wnid(k)).glob(f"{wnid(k)}_*.JPEG"))) == 4 for k in range(3))
    rows = list(csv.DictReader(open(out / "LOC_val_solution.csv")))
    assert sorted(r["ImageId"] for r in rows) == [f"ILSVRC2012_val_{n:08d}" for n in range(1, 7)]
    assert sorted(p.stem for p in (out / "val").iterdir()) == sorted(r["ImageId"] for r in rows)
    counts = np.bincount([int(r["PredictionString"].split()[0][1:]) for r in rows])
    assert counts.tolist() == [2, 2, 2]
    assert (out / "LOC_synset_mapping.txt").read_text().splitlines()[1] == f"{wnid(1)} {class_look(1)[2]}"
    for p in (out / "train").rglob("*.JPEG"):
        im = Image.open(p)
        assert im.format == "JPEG" and im.mode == "RGB" and 60 <= min(im.size) <= max(im.size) <= 90


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = files(make_dataset(tmp_path / "a", 2, 3, 1, size_range=(40, 64), seed=0))
    b = files(make_dataset(tmp_path / "b", 2, 3, 1, size_range=(40, 64), seed=0, workers=2))
    c = files(make_dataset(tmp_path / "c", 2, 3, 1, size_range=(40, 64), seed=1))
    assert a == b and a.keys() == c.keys() and a != c


def test_imagenet_like_sizes_by_default(tmp_path):
    out = make_dataset(tmp_path, classes=2, per_class=6, val_per_class=0, seed=2)
    sizes = [Image.open(p).size for p in (out / "train").rglob("*.JPEG")]
    nbytes = [p.stat().st_size for p in (out / "train").rglob("*.JPEG")]
    assert all(300 <= min(s) and max(s) <= 640 for s in sizes)
    assert 40_000 < np.mean(nbytes) < 200_000


def test_the_shape_carries_the_class_colour(tmp_path):
    """The learnable cue: inside each val box, the pixels nearest the class colour are that colour (within jitter)."""
    out = make_dataset(tmp_path, classes=4, per_class=0, val_per_class=3, size_range=(120, 160), seed=3)
    for row in csv.DictReader(open(out / "LOC_val_solution.csv")):
        w, *box = row["PredictionString"].split()
        x0, y0, x1, y1 = map(int, box)
        rgb = np.asarray(Image.open(out / "val" / f"{row['ImageId']}.JPEG")).astype(float)[y0:y1, x0:x1].reshape(-1, 3)
        colour = np.array(class_look(int(w[1:]))[1])
        assert np.sort(np.abs(rgb - colour).max(1))[len(rgb) // 10] < 60  # the shape covers > 10% of its box


def test_devkit_layout(tmp_path):
    out = make_dataset(
        tmp_path, classes=3, per_class=1, val_per_class=2, size_range=(40, 64), seed=4, val_layout="devkit"
    )
    data = out / "ILSVRC2012_devkit_t12" / "data"
    ids = synsets(data / "meta.mat")
    assert sorted(w for w, _ in ids.values()) == [wnid(k) for k in range(3)] and sorted(ids) == [1, 2, 3]
    truth = [int(x) for x in (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    assert len(truth) == 6 and sorted(ids[i][0] for i in truth) == sorted([wnid(k) for k in range(3)] * 2)
    assert not (out / "LOC_val_solution.csv").exists() and not (out / "LOC_synset_mapping.txt").exists()


def test_quirks_and_cli(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path / "q"),
                "--classes",
                "2",
                "--per-class",
                "2",
                "--val-per-class",
                "1",
                "--size-range",
                "40",
                "64",
                "--quirks",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    folder = tmp_path / "q" / "train" / wnid(0)
    assert Image.open(folder / f"{wnid(0)}_cmyk.JPEG").mode == "CMYK"
    assert Image.open(folder / f"{wnid(0)}_png.JPEG").format == "PNG"
    assert Image.open(folder / f"{wnid(0)}_gray.JPEG").mode == "L"
    assert (folder / f"{wnid(0)}_empty.JPEG").stat().st_size == 0
    assert not (folder / f"{wnid(0)}_unreadable.JPEG").exists()  # a dangling link
    assert set(QUIRKS) == {p.name.split("_", 1)[-1].split(".")[0] for p in folder.iterdir()} - {"0", "1"}
    assert list((tmp_path / "q" / "train" / wnid(2)).iterdir()) == []
    assert main(["--out", str(tmp_path / "q")]) == 2  # never writes into a non-empty folder


@pytest.mark.slow
def test_workers_end_when_the_parent_handles_sigterm_itself(tmp_path):
    """run.py records SIGTERM instead of dying; the pool's workers must still end on Pool.terminate's SIGTERM (they
    inherited the handler once, and the demo hung in make_dataset)."""
    script = (
        "import signal, sys\n"
        "from pipeline.synthetic import make_dataset\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "for i in range(3):\n"
        f"    make_dataset(r'{tmp_path}' + f'/{{i}}', 2, 8, 2, size_range=(32, 40), workers=2)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung workers too: they ignore SIGTERM
        proc.communicate()
        raise AssertionError("make_dataset's pool did not end: its workers outlived Pool.terminate") from None
    assert proc.returncode == 0, err.decode()
    assert len(list((tmp_path / "2" / "train").rglob("*.JPEG"))) == 16
