"""DALI failing on one rank of a torchrun job: a damaged JPEG that rank 1 alone reads, in validation and inside an
epoch. The job ends within seconds with one line naming the file, no traceback and no process left; what was saved
stays, and once the file is restored the same command continues."""

import contextlib
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import FAST, ROOT, start_torchrun

import run
from model.train import checkpoint
from pipeline import DaliLoader, load_manifest
from pipeline.manifest import FIX_HINT
from tools.shard_imagenet import main as shard_main

pytestmark = pytest.mark.slow  # torchrun starts

LIMIT_S = 90  # a run here takes ~20 s on 2 loaded cores; a hang fails the test at this, its processes killed


def torchrun(argv) -> tuple[int, str, str, list[int]]:
    """torchrun of run.py on 2 CPU ranks: (status, stdout, stderr, the workers' pids), failing the test if the job is
    not over within LIMIT_S; whatever is left of it then is killed."""
    proc = start_torchrun("run.py", *argv)
    workers = []
    try:
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                workers = psutil.Process(proc.pid).children()
            time.sleep(0.05)
        try:
            out, err = proc.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not end within {LIMIT_S} s (a rank hangs)")
    finally:
        for p in workers:  # torchrun starts each in a session of its own
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # psutil's Process: not another process that took the pid since
        proc.kill()
        proc.wait()
    return proc.returncode, out, err, [p.pid for p in workers]


def batches(shards: Path, split: str, augment: str, rank: int) -> list[list[tuple[str, str]]]:
    """(tar name, key) of each sample of each batch that `rank` of 2 reads in epoch 1, as run.py's loader reads them."""
    cfg = run.parse(["--shards", str(shards), "--workdir", str(shards / "unused"), *FAST])
    loader = DaliLoader(
        load_manifest(shards), split, cfg, augment=augment, device="cpu", rank=rank, world_size=2, dtype=torch.float32
    )
    with loader:
        return [list(zip(loader.info["tar"], loader.info["key"])) for _ in loader]


def read_by_one(shards: Path, split: str, augment: str, step: int) -> tuple[Path, str]:
    """A sample that rank 1 reads in its batch `step` of epoch 1, from a shard rank 0 does not read then: (tar, key)."""
    other = {tar for batch in batches(shards, split, augment, 0) for tar, _ in batch}
    ours = [(tar, key) for tar, key in batches(shards, split, augment, 1)[step] if tar not in other]
    assert ours, f"rank 0 reads every shard rank 1's batch {step} reads"
    return shards / ours[-1][0], ours[-1][1]


def damage(tar: Path, key: str) -> bytes:
    """Zeroes the JPEG of sample `key` in place (the tar's size unchanged, so only decoding it fails): its bytes."""
    with tarfile.open(tar) as t:
        member = t.getmember(f"{key}.jpg")
    with open(tar, "r+b") as f:
        f.seek(member.offset_data)
        jpeg = f.read(member.size)
        f.seek(member.offset_data)
        f.write(bytes(member.size))
    return jpeg


def restore(tar: Path, key: str, jpeg: bytes) -> None:
    with tarfile.open(tar) as t:
        member = t.getmember(f"{key}.jpg")
    with open(tar, "r+b") as f:
        f.seek(member.offset_data)
        f.write(jpeg)


@pytest.fixture(scope="module")
def small_shards(demo_src, tmp_path_factory) -> Path:
    """demo_src in shards of 16: each rank reads shards of its own (train: 3 each, val: rank 1 alone reads the last)."""
    out = tmp_path_factory.mktemp("small") / "shards"
    argv = ["--src", str(demo_src), "--out", str(out), "--resize", "short:80", "--shard-size", "16", "--workers", "1"]
    assert shard_main(argv) == 0
    return out


def ended_as_one_line(code: int, err: str, workers: list[int]) -> str:
    """Checks that the job failed with one line of run.py's, no traceback of its processes and none of them left."""
    assert code != 0
    ours = [line for line in err.splitlines() if "run.py:" in line and not line.lstrip().startswith("File")]
    assert len(ours) == 1, err[-3000:]
    assert f'File "{ROOT / "run.py"}"' not in err and "[rank" not in err, err[-3000:]  # torchrun prints its own report
    assert "SIGKILL" not in err, err[-3000:]  # no rank outlived torchrun's SIGTERM (30 s before it kills)
    assert len(workers) == 2 and not [p for p in workers if psutil.pid_exists(p)]
    return ours[0]


def test_a_damaged_val_sample_of_one_rank_ends_the_job_and_keeps_the_epochs_training(small_shards, tmp_path):
    """Rank 1 fails while rank 0 validates its share: both save the epoch's training, then stop; once the file is
    back, the same command validates that epoch without training it again."""
    shards = Path(shutil.copytree(small_shards, tmp_path / "shards"))
    tar, key = read_by_one(shards, "val", "center", 0)
    jpeg = damage(tar, key)
    workdir = tmp_path / "w"
    argv = ["--shards", str(shards), "--workdir", str(workdir), *FAST, "--epochs", "1"]
    code, out, err, workers = torchrun(argv)
    line = ended_as_one_line(code, err, workers)
    saved = workdir / "checkpoints" / "step-000000003.pt"
    assert line.startswith(f"run.py: {tar}: {key}.jpg does not decode") and line.endswith(
        f"(validating epoch 1 at step 3; its training is saved in {saved})"
    ), line
    assert checkpoint.read(saved)["step"] == 3 and checkpoint.step_files(workdir / "checkpoints") == [saved]
    assert not (workdir / "summary.json").exists()
    restore(tar, key, jpeg)
    code, out, err, _ = torchrun(argv)
    assert code == 0, err[-3000:]
    assert f"continuing from {saved}" in out and "epoch 1/1 step" not in out  # validated, not trained again
    assert (workdir / "summary.json").exists()


def test_a_damaged_train_sample_of_one_rank_ends_the_job_inside_an_epoch(small_shards, tmp_path):
    """Rank 1 fails on its third batch while rank 0 is in that step's gradient all-reduce; the checkpoint of step 2
    stays the newest, and the same command continues from it once the file is back."""
    shards = Path(shutil.copytree(small_shards, tmp_path / "shards"))
    tar, key = read_by_one(shards, "train", "paper", 2)
    jpeg = damage(tar, key)
    workdir = tmp_path / "w"
    argv = ["--shards", str(shards), "--workdir", str(workdir), *FAST, "--epochs", "1"]
    code, out, err, workers = torchrun([*argv, "--checkpoint-minutes", "0.0001"])  # a checkpoint each log line
    line = ended_as_one_line(code, err, workers)
    assert line.startswith(f"run.py: {tar}: {key}.jpg does not decode") and line.endswith(FIX_HINT.format(dir=shards))
    saved = workdir / "checkpoints" / "step-000000002.pt"
    assert checkpoint.step_files(workdir / "checkpoints") == [saved] and checkpoint.read(saved)["step"] == 2
    restore(tar, key, jpeg)
    code, out, err, _ = torchrun(argv)
    assert code == 0, err[-3000:]
    assert f"continuing from {saved}: epoch 1, step 2" in out and (workdir / "summary.json").exists()
