"""Sharding on several machines: ranks as real concurrent processes writing one --out (a folder or a bucket on
moto_server), a rank killed and run again, refusals of a run without ranks and of a rank with another plan, and the
manifest merged from the records: byte-identical to one machine's run."""

import builtins
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import STOPPING, objects, one_line, tree

from tools.shard_imagenet import main, parse_config

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--resize", "short:40", "--shard-size", "16", "--seed", "3", "--workers", "1"]
TWO = ["--world-size", "2"]


@pytest.fixture(scope="module")
def src(demo_src, tmp_path_factory) -> Path:
    """A copy of the demo source (same mtimes) that a test may touch and restore: the manifest records its path."""
    return Path(shutil.copytree(demo_src, tmp_path_factory.mktemp("ranks") / "src"))


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["--src", str(src), "--out", str(out), *ARGS]) == 0
    return tree(out)


def start(argv: list[str], script: Path | None = None) -> subprocess.Popen:
    program = [str(script)] if script else ["-m", "tools.shard_imagenet"]
    return subprocess.Popen(
        [sys.executable, *program, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stopped(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        assert proc.poll() is None, f"the rank ended before its stop: {proc.communicate()}"
        assert time.monotonic() < deadline, "the rank never reached its stop"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_two_concurrent_ranks_one_killed_and_rerun_equal_one_machine(src, reference, tmp_path, capsys, request, where):
    out = request.getfixturevalue("bucket_url") if where == "bucket" else str(tmp_path / "out")
    contents = (lambda: objects(out)) if where == "bucket" else (lambda: tree(Path(out)))
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    argv = ["--src", str(src), "--out", out, *ARGS, *TWO]
    killed, rank0 = start([*argv, "--rank", "1"], script), None
    try:
        stopped(killed)  # rank 1 holds its lock, one shard written, while rank 0 writes all of its own
        rank0 = start([*argv, "--rank", "0"])
        said, err = rank0.communicate(timeout=300)
        assert rank0.returncode == 0, err
        assert "rank 0 of 2: its shards are done; 3 shards of other ranks are not yet" in said
        assert "manifest.json" not in contents()

        assert main(["--src", str(src), "--out", out, *ARGS]) == 2  # a run without ranks, while rank 1 lives
        one_line(capsys.readouterr().err, f"--out {out} is being written by ranks", f"pid {killed.pid}")
        assert main(["--src", str(src), "--out", out, *ARGS, "--world-size", "3", "--rank", "2"]) == 2
        one_line(capsys.readouterr().err, "ranks of another --world-size", f"pid {killed.pid}")
        assert main([*argv, "--rank", "0", "--quality", "80"]) == 2
        one_line(capsys.readouterr().err, "different arguments", "quality 95 (now 80)")
        photo = next((src / "train").rglob("*.JPEG"))
        st = photo.stat()
        os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # --src changed under the running ranks
        try:
            assert main([*argv, "--rank", "0"]) == 2
            one_line(capsys.readouterr().err, "being written with another plan", "--src changed")
        finally:
            os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        if rank0:
            rank0.kill()
            rank0.wait()
    capsys.readouterr()
    assert main([*argv, "--rank", "1"]) == 0  # the killed rank, run again, continues its own shards and merges
    said = capsys.readouterr().out
    assert "resuming: 1 of 4 shards already complete" in said and "done: 120 images written" in said
    assert contents() == reference


@pytest.mark.slow
def test_the_command_without_ranks_finishes_the_rest_and_merges_without_reading_the_ranks_shards(
    src, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    argv = ["--src", str(src), "--out", str(out), *ARGS]
    assert main([*argv, *TWO, "--rank", "0"]) == 0
    theirs = {out / n for n in os.listdir(out) if n.endswith((".tar", ".idx"))}
    assert len(theirs) == 8 and not (out / "manifest.json").exists()
    opened, real = [], builtins.open

    def spy(file, mode="r", *a, **k):
        opened.append(Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None)
        return real(file, mode, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", spy)
        capsys.readouterr()
        assert main(argv) == 0
    assert "resuming: 4 of 8 shards already complete" in capsys.readouterr().out
    assert theirs.isdisjoint(opened) and len({p for p in opened if p and p.suffix == ".tar"}) >= 4
    assert tree(out) == reference


@pytest.mark.parametrize(
    "env,flags,rank,world",
    [
        ({}, [], 0, 1),
        ({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"}, [], 3, 4),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, [], 5, 8),
        ({"RANK": "3", "WORLD_SIZE": "4"}, ["--rank", "1", "--world-size", "2"], 1, 2),
    ],
)
def test_rank_and_world_size_come_from_the_flags_then_torchrun_then_slurm(
    demo_src, tmp_path, monkeypatch, env, flags, rank, world
):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = parse_config(["--src", str(demo_src), "--out", str(tmp_path / "o"), *flags])
    assert (cfg.rank, cfg.world_size) == (rank, world)


@pytest.mark.parametrize(
    "env,flags,says",
    [
        ({"RANK": "one"}, [], "$RANK='one' is not a whole number"),
        ({}, ["--rank", "2", "--world-size", "2"], "rank 2 is outside a world of 2"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "2"}, [], "rank 4 is outside a world of 2"),
        ({}, ["--world-size", "0"], "--world-size 0: must be at least 1"),
    ],
)
def test_a_bad_rank_is_one_line_and_exit_2(demo_src, tmp_path, monkeypatch, capsys, env, flags, says):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["--src", str(demo_src), "--out", str(tmp_path / "o"), *flags]) == 2
    one_line(capsys.readouterr().err, says)
    assert not (tmp_path / "o").exists()
