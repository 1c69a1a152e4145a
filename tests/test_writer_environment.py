"""What machines do to a run: permissions, a full disk, a CSV saved by a spreadsheet, a '#' in a folder name. Each
ends in one line naming the file and the fix (never a traceback), and the rerun after the fix completes."""

import builtins
import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import one_line, tree

import pipeline.atomic
from pipeline.synthetic import make_dataset, wnid
from pipeline.writer.tars import read_shard
from tools.shard_imagenet import main

ARGS = ["--resize", "short:32", "--workers", "1", "--shard-size", "5"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("env"), classes=2, per_class=12, val_per_class=2, size_range=(40, 64), seed=4
    )


def test_out_without_write_permission(src, tmp_path, deny, capsys):
    out = tmp_path / "out"
    out.mkdir()
    deny(out)
    assert main(["--src", str(src), "--out", str(out), *ARGS]) == 2
    one_line(capsys.readouterr().err, str(out), "Permission denied", progress="sharding:")


def test_class_folder_without_read_permission_stops_before_any_work(src, tmp_path, deny, capsys):
    mine = Path(shutil.copytree(src, tmp_path / "src"))
    deny(mine / "train" / wnid(1))
    assert main(["--src", str(mine), "--out", str(tmp_path / "out"), *ARGS]) == 2
    one_line(capsys.readouterr().err, f"train/{wnid(1)}", "Permission denied", "chmod", progress="sharding:")
    assert not list((tmp_path / "out").iterdir())


def test_verify_of_a_tar_without_read_permission(src, tmp_path, deny, capsys):
    out = tmp_path / "out"
    assert main(["--src", str(src), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    deny(out / "train-000001.tar")
    assert main(["--verify", str(out)]) == 2
    one_line(capsys.readouterr().err, "train-000001.tar", "Permission denied", progress="sharding:")


class FullDisk:
    """A file on a disk that fills up halfway through the write, as ENOSPC arrives from write(2)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_names_the_file_keeps_nothing_half_written_and_the_rerun_completes(
    src, tmp_path, monkeypatch, capsys
):
    assert main(["--src", str(src), "--out", str(tmp_path / "reference"), *ARGS]) == 0
    out = tmp_path / "out"

    def open_on_a_full_disk(file, mode="r", *a, **k):
        f = builtins.open(file, mode, *a, **k)
        return FullDisk(f) if Path(file).name == ".train-000002.tar.tmp" else f

    monkeypatch.setattr(pipeline.atomic, "open", open_on_a_full_disk, raising=False)
    capsys.readouterr()
    assert main(["--src", str(src), "--out", str(out), *ARGS]) == 2
    one_line(
        capsys.readouterr().err,
        str(out / "train-000002.tar"),
        "disk full",
        "rerun the same command",
        progress="sharding:",
    )
    assert not list(out.glob(".*.tmp")) and not (out / "train-000002.tar").exists()
    monkeypatch.undo()
    assert main(["--src", str(src), "--out", str(out), *ARGS]) == 0
    assert "resuming: 2 of" in capsys.readouterr().out
    assert tree(out) == tree(tmp_path / "reference")


class SlowDisk(FullDisk):
    """A file whose write stalls halfway (a slow disk, a busy worker): the run ends before it does."""

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        time.sleep(60)


@pytest.mark.timeout(60)
def test_disk_full_in_one_worker_leaves_no_partial_shard_of_another(src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def open_on_a_full_disk(file, mode="r", *a, **k):
        f = builtins.open(file, mode, *a, **k)
        return {".train-000000.tar.tmp": SlowDisk, ".train-000001.tar.tmp": FullDisk}.get(Path(file).name, lambda f: f)(
            f
        )

    monkeypatch.setattr(pipeline.atomic, "open", open_on_a_full_disk, raising=False)  # the workers fork with it
    assert (
        main(["--src", str(src), "--out", str(out), "--resize", "short:32", "--workers", "2", "--shard-size", "5"]) == 2
    )
    one_line(capsys.readouterr().err, str(out / "train-000001.tar"), "disk full", progress="sharding:")
    assert not list(out.glob(".*.tmp"))  # train-000000's half, whose worker was stopped mid-write, too


def val_labels(out: Path) -> dict[str, int]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s.path: s.label for sh in manifest["splits"]["val"]["shards"] for s in read_shard(out / sh["tar"])}


def test_kaggle_csv_saved_by_a_spreadsheet_with_a_byte_order_mark(src, tmp_path):
    assert main(["--src", str(src), "--out", str(tmp_path / "plain"), *ARGS]) == 0
    mine = Path(shutil.copytree(src, tmp_path / "src"))
    csv = mine / "LOC_val_solution.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert main(["--src", str(mine), "--out", str(tmp_path / "bom"), *ARGS]) == 0
    assert val_labels(tmp_path / "bom") == val_labels(tmp_path / "plain") and len(val_labels(tmp_path / "bom")) == 4


def test_baseline_loader_reads_shards_under_a_folder_with_a_hash_in_its_name(demo_shards, tmp_path):
    from pipeline.baseline import baseline_loader
    from pipeline.manifest import load_manifest

    shards = Path(shutil.copytree(demo_shards, tmp_path / "run #1" / "shards"))
    images, labels = next(iter(baseline_loader(load_manifest(shards), 4, crop_size=48, workers=0)))
    assert images.shape == (4, 3, 48, 48) and labels.shape == (4,)


def test_config_is_printed_one_option_per_line(demo_src, demo_shards, capsys):
    argv = [
        "--src",
        str(demo_src),
        "--out",
        str(demo_shards),
        "--resize",
        "short:80",
        "--shard-size",
        "32",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ShardConfig(" not in out
    lines = out.splitlines()
    rows = [line.split() for line in lines]
    assert lines[0] == "config:" and rows[1] == ["src", str(demo_src)]
    assert ["resize", "short:80"] in rows and ["splits", "train", "val"] in rows
