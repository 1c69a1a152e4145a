"""Crashes and verification: a rerun after kill -9 is byte-identical to an uninterrupted run; --verify finds one flipped byte."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import pipeline.writer.build as shard_build
from pipeline.writer.synthetic import make_dataset
from tools.shard_imagenet import main
from pipeline.writer.tars import build_shard, read_shard, Sample

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--resize", "short:40", "--shard-size", "16", "--seed", "3"]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume"), classes=4, per_class=75, val_per_class=8,
                        size_range=(48, 96), seed=11)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS]) == 0
    return tree(out)


def test_kill_9_mid_run_then_rerun_is_byte_identical(src, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "shard_imagenet.py"), "--src", str(src), "--out", str(out),
           "--workers", "2", *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and len(list((out / ".progress").glob("train-*.json"))) < 2:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the pool's workers die with it, as in a real crash
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: make the data set larger"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert tree(out) == reference


def test_interrupted_run_with_debris_resumes_to_the_same_bytes(src, reference, tmp_path, monkeypatch, capsys):
    """Finished shards are kept only if their checksums match; partial and stale files are replaced."""
    out = tmp_path / "out"
    real, calls = shard_build.write_shard, []

    def crash_on_fourth(*a):
        calls.append(a[1])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(shard_build, "write_shard", crash_on_fourth)
    assert main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS]) == 130
    monkeypatch.undo()
    (out / calls[3]).with_suffix(".tar").write_bytes(b"half a tar")  # crash between tar and index writes
    (out / f".{calls[3]}.idx.tmp").write_bytes(b"v1.2")  # crash inside atomic_write
    with open(out / f"{calls[1]}.tar", "r+b") as f:  # a finished shard damaged afterwards
        f.seek(1000)
        f.write(b"\xff")
    assert main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS]) == 0
    assert "resuming: 2 of" in capsys.readouterr().out
    assert tree(out) == reference


def test_rerun_of_a_finished_folder_only_clears_debris(src, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS]) == 0
    (out / ".progress").mkdir()  # a crash after the manifest's rename, before the cleanup
    (out / ".progress" / "train-000000.json").write_text("{}")
    (out / ".manifest.json.tmp").write_text("{")
    assert main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS]) == 0
    assert "already complete" in capsys.readouterr().out
    assert tree(out) == reference


def test_shards_are_exactly_once_and_seed_changes_the_order(src, reference, tmp_path):
    manifest = json.loads(reference["manifest.json"])
    written = [s for sh in manifest["splits"]["train"]["shards"] for s in read_shard_bytes(reference[sh["tar"]])]
    keys = [s.key for s in written]
    assert sorted(s.path for s in written) == sorted(str(p.relative_to(src)) for p in (src / "train").glob("*/*"))
    assert main(["--src", str(src), "--out", str(tmp_path), "--workers", "1", *ARGS[:-1], "4"]) == 0
    other = json.loads((tmp_path / "manifest.json").read_text())
    assert [s.key for s in read_shard(tmp_path / other["splits"]["train"]["shards"][0]["tar"])] != keys[:16]


def read_shard_bytes(data: bytes) -> list[Sample]:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(data)
        f.flush()
        return read_shard(Path(f.name))


@pytest.fixture
def restored(reference, tmp_path):
    for name, data in reference.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("victim", ["train-000002.tar", "train-000002.idx", "val-000001.tar"])
def test_verify_names_the_shard_with_one_flipped_byte(restored, capsys, victim):
    assert main(["--verify", str(restored)]) == 0
    data = bytearray((restored / victim).read_bytes())
    data[len(data) // 3] ^= 0x01
    (restored / victim).write_bytes(bytes(data))
    assert main(["--verify", str(restored)]) == 1
    assert victim in capsys.readouterr().err


def test_verify_decodes_every_image(restored, capsys):
    """A shard whose checksums were recomputed around a broken JPEG still fails: verify decodes everything."""
    import hashlib
    manifest = json.loads((restored / "manifest.json").read_text())
    shard = manifest["splits"]["val"]["shards"][0]
    samples = read_shard(restored / shard["tar"])
    samples[1] = replace(samples[1], jpeg=samples[1].jpeg[: len(samples[1].jpeg) // 2])
    tar, index = build_shard(samples)
    (restored / shard["tar"]).write_bytes(tar)
    (restored / shard["index"]).write_bytes(index)
    shard.update(tar_bytes=len(tar), tar_sha256=hashlib.sha256(tar).hexdigest(),
                 index_sha256=hashlib.sha256(index).hexdigest())
    (restored / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--verify", str(restored)]) == 1
    assert shard["tar"] in capsys.readouterr().err
