"""Reruns as real runs meet them: after a stop byte-identical to an uninterrupted run, with debris, after the source
was edited, --strict; --verify finds one flipped byte or a file written twice. (Stops of separate processes: kill -9,
SIGTERM, Ctrl-C, the OOM killer, a second run: test_writer_processes.py.)"""

import json
import os
import shutil
from dataclasses import replace
from hashlib import sha256
from pathlib import Path

import pytest
from helpers import tree

import pipeline.writer.build as shard_build
from pipeline.manifest import sealed
from pipeline.synthetic import make_dataset, wnid
from pipeline.writer.tars import Sample, build_shard, read_shard
from tools.shard_imagenet import main

ARGS = ["--resize", "short:40", "--shard-size", "16", "--seed", "3"]
pytestmark = pytest.mark.slow  # each test runs the sharder, most in processes they interrupt


def written_paths(out: Path, split: str) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s.path for sh in manifest["splits"][split]["shards"] for s in read_shard(out / sh["tar"])]


def source_paths(src: Path, split: str) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in (src / split).rglob("*") if p.is_file())


def shard(src: Path, out: Path, *extra: str) -> int:
    return main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS, *extra])


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert shard(pristine, out) == 0
    return tree(out)


@pytest.fixture
def src(pristine, tmp_path):
    """A copy of the source the test may edit, with the same mtimes (what the fingerprint compares)."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def interrupt_after(monkeypatch, shards: int) -> list[str]:
    """Ctrl-C as the run starts shard number `shards` + 1 (--workers 1: the shards are written in this process, in
    plan order); the list of the shards it was asked to write."""
    real, calls = shard_build.write_task, []

    def write_task(task):
        calls.append(task.stem)
        if len(calls) > shards:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(shard_build, "write_task", write_task)
    return calls


def test_interrupted_run_with_debris_resumes_to_the_same_bytes(pristine, reference, tmp_path, monkeypatch, capsys):
    """Finished shards are kept only if their checksums match; partial and stale files are replaced."""
    out = tmp_path / "out"
    calls = interrupt_after(monkeypatch, 3)
    assert shard(pristine, out) == 130
    monkeypatch.undo()
    (out / calls[3]).with_suffix(".tar").write_bytes(b"half a tar")  # crash between tar and index writes
    (out / f".{calls[3]}.idx.tmp").write_bytes(b"v1.2")  # crash inside atomic_write
    with open(out / f"{calls[1]}.tar", "r+b") as f:  # a finished shard damaged afterwards
        f.seek(1000)
        f.write(b"\xff")
    assert shard(pristine, out) == 0
    assert "resuming: 2 of" in capsys.readouterr().out
    assert tree(out) == reference


def test_rerun_of_a_finished_folder_only_clears_debris(pristine, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(pristine, out) == 0
    (out / ".progress").mkdir()  # a crash after the manifest's rename, before the cleanup
    (out / ".progress" / "train-000000.json").write_text("{}")
    (out / ".manifest.json.tmp").write_text("{")
    assert shard(pristine, out) == 0
    assert "already complete" in capsys.readouterr().out
    assert tree(out) == reference


def test_shards_are_exactly_once_and_seed_changes_the_order(pristine, reference, tmp_path):
    manifest = json.loads(reference["manifest.json"])
    written = [s for sh in manifest["splits"]["train"]["shards"] for s in read_shard_bytes(reference[sh["tar"]])]
    keys = [s.key for s in written]
    assert sorted(s.path for s in written) == source_paths(pristine, "train")
    assert main(["--src", str(pristine), "--out", str(tmp_path), "--workers", "1", *ARGS[:-1], "4"]) == 0
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
    shard.update(
        tar_bytes=len(tar), tar_sha256=hashlib.sha256(tar).hexdigest(), index_sha256=hashlib.sha256(index).hexdigest()
    )
    (restored / "manifest.json").write_text(json.dumps(sealed(manifest)))
    assert main(["--verify", str(restored)]) == 1
    assert shard["tar"] in capsys.readouterr().err


def edit(src: Path) -> None:
    """What a user does between runs: rename one photo, delete another, add a new one."""
    folder = src / "train" / wnid(1)
    (folder / f"{wnid(1)}_3.JPEG").rename(folder / "renamed.JPEG")
    (folder / f"{wnid(1)}_4.JPEG").unlink()
    shutil.copy(src / "train" / wnid(2) / f"{wnid(2)}_0.JPEG", folder / "added.JPEG")


def test_interrupted_run_on_an_edited_source_plans_again_and_holds_the_folder_exactly_once(
    src, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 3)
    assert shard(src, out) == 130
    monkeypatch.undo()
    edit(src)
    assert shard(src, out) == 0
    assert "--src changed since the interrupted run" in capsys.readouterr().out
    for split in ("train", "val"):
        assert sorted(written_paths(out, split)) == source_paths(src, split)
    assert main(["--verify", str(out)]) == 0
    fresh = tmp_path / "fresh"
    assert shard(src, fresh) == 0
    assert tree(out) == tree(fresh)


def test_finished_folder_of_an_edited_source_is_not_called_current(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(src, out) == 0
    before = tree(out)
    edit(src)
    capsys.readouterr()
    assert shard(src, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed since" in err and "new --out" in err and "Traceback" not in err
    assert tree(out) == before  # refused, not overwritten
    shutil.rmtree(out)  # the fix the message names
    assert shard(src, out) == 0
    assert sorted(written_paths(out, "train")) == source_paths(src, "train")


def test_verify_finds_a_source_file_written_twice(reference, tmp_path, capsys):
    """What the issue's rerun left behind: checksums all consistent, one photo in two shards under two keys."""
    for name, data in reference.items():
        (tmp_path / name).write_bytes(data)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    first, second = manifest["splits"]["train"]["shards"][:2]
    twice = read_shard(tmp_path / first["tar"])[0]
    samples = read_shard(tmp_path / second["tar"])
    samples[0] = replace(twice, key=samples[0].key)
    tar, index = build_shard(samples)
    (tmp_path / second["tar"]).write_bytes(tar)
    (tmp_path / second["index"]).write_bytes(index)
    second.update(tar_bytes=len(tar), tar_sha256=sha256(tar).hexdigest(), index_sha256=sha256(index).hexdigest())
    (tmp_path / "manifest.json").write_text(json.dumps(sealed(manifest)))
    assert main(["--verify", str(tmp_path)]) == 1
    assert f"{twice.path} is in the shards 2 times" in capsys.readouterr().err


def test_touching_a_file_counts_as_a_change(src, tmp_path):
    """Same names and sizes, new content: only the mtime tells, and it must."""
    out = tmp_path / "out"
    assert shard(src, out) == 0
    victim = src / "val" / "ILSVRC2012_val_00000001.JPEG"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert shard(src, out) == 2


def test_strict_keeps_failing_on_every_rerun_while_the_shards_hold_rejections(tmp_path, capsys):
    src = make_dataset(tmp_path / "src", classes=2, per_class=3, val_per_class=1, size_range=(40, 64), seed=2)
    (src / "train" / wnid(0) / "half-downloaded.JPEG").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = tmp_path / "out"
    for _ in range(2):
        assert shard(src, out, "--strict") == 1
        assert "--strict: 1 files rejected" in capsys.readouterr().err
    assert shard(src, out) == 0  # without --strict a rejection is allowed
    assert "already complete" in capsys.readouterr().out
