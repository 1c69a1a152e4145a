"""Reruns as real runs meet them: the source edited between runs, a worker killed by the OOM killer, Ctrl-C, --strict."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from hashlib import sha256
from pathlib import Path

import psutil
import pytest

import pipeline.writer.build as shard_build
from pipeline.writer.synthetic import make_dataset, wnid
from pipeline.writer.tars import build_shard, read_shard
from tools.shard_imagenet import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--resize", "short:40", "--shard-size", "16", "--seed", "3"]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def written_paths(out: Path, split: str) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s.path for sh in manifest["splits"][split]["shards"] for s in read_shard(out / sh["tar"])]


def source_paths(src: Path, split: str) -> list[str]:
    return sorted(str(p.relative_to(src)) for p in (src / split).rglob("*") if p.is_file())


def shard(src: Path, out: Path, *extra: str) -> int:
    return main(["--src", str(src), "--out", str(out), "--workers", "1", *ARGS, *extra])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("rerun"), classes=4, per_class=75, val_per_class=8,
                        size_range=(48, 96), seed=11)


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert shard(pristine, out) == 0
    return tree(out)


@pytest.fixture
def src(pristine, tmp_path):
    """A copy of the source the test may edit, with the same mtimes (what the fingerprint compares)."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def interrupt_after(monkeypatch, shards: int) -> None:
    """Ctrl-C while the run writes shard number `shards` + 1."""
    real, calls = shard_build.write_shard, []

    def write_shard(*a):
        calls.append(a[1])
        if len(calls) > shards:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(shard_build, "write_shard", write_shard)


def edit(src: Path) -> None:
    """What a user does between runs: rename one photo, delete another, add a new one."""
    folder = src / "train" / wnid(1)
    (folder / f"{wnid(1)}_3.JPEG").rename(folder / "renamed.JPEG")
    (folder / f"{wnid(1)}_4.JPEG").unlink()
    shutil.copy(src / "train" / wnid(2) / f"{wnid(2)}_0.JPEG", folder / "added.JPEG")


def test_interrupted_run_on_an_edited_source_plans_again_and_holds_the_folder_exactly_once(
        src, tmp_path, monkeypatch, capsys):
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
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--verify", str(tmp_path)]) == 1
    assert f"{twice.path} is in the shards 2 times" in capsys.readouterr().err


def test_touching_a_file_counts_as_a_change(src, tmp_path):
    """Same names and sizes, new content: only the mtime tells, and it must."""
    out = tmp_path / "out"
    assert shard(src, out) == 0
    victim = src / "val" / "ILSVRC2012_val_00000001.JPEG"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert shard(src, out) == 2


def run_cli(src: Path, out: Path, workers: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "tools" / "shard_imagenet.py"), "--src", str(src), "--out", str(out),
           "--workers", str(workers), *ARGS]
    # A session of its own, like a terminal's foreground job: the test can signal the whole group as Ctrl-C does.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_first_shard(proc: subprocess.Popen, out: Path) -> None:
    while proc.poll() is None and not list((out / ".progress").glob("train-*.json")):
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the test could interfere: make the data set larger"


def test_a_worker_killed_by_the_oom_killer_stops_the_run_with_one_line_and_the_rerun_completes(
        pristine, reference, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(pristine, out)
    wait_for_first_shard(proc, out)
    worker = psutil.Process(proc.pid).children()[0]
    worker.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run hangs after a worker died")
    assert time.monotonic() - killed < 20
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "worker process was killed" in last and "rerun the same command" in last and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    assert shard(pristine, out) == 0
    assert tree(out) == reference


def test_ctrl_c_prints_one_line_not_a_traceback_per_worker_and_the_rerun_completes(pristine, reference, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(pristine, out, workers=4)
    wait_for_first_shard(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the parent and every worker get SIGINT
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("sharding:")]
    assert lines == ["interrupted; rerun the same command to resume"]
    assert shard(pristine, out) == 0
    assert tree(out) == reference


def test_strict_keeps_failing_on_every_rerun_while_the_shards_hold_rejections(tmp_path, capsys):
    src = make_dataset(tmp_path / "src", classes=2, per_class=3, val_per_class=1, size_range=(40, 64), seed=2)
    (src / "train" / wnid(0) / "half-downloaded.JPEG").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = tmp_path / "out"
    for _ in range(2):
        assert shard(src, out, "--strict") == 1
        assert "--strict: 1 files rejected" in capsys.readouterr().err
    assert shard(src, out) == 0  # without --strict a rejection is allowed
    assert "already complete" in capsys.readouterr().out
