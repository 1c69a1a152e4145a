"""A JPEG whose header does not parse, in a batch large enough that DALI splits it over its threads: run.py ends in
the one line naming the shard and the JPEG, not in a crash. Run in a process of its own: DALI's decoders took the
whole process down with SIGSEGV on such a batch."""

import random
import shutil
import subprocess
import sys
import tarfile

import pytest
from helpers import ROOT, one_line, train

from pipeline import DaliLoader, ShardError, load_manifest
from pipeline.manifest import FIX_HINT
from pipeline.settings import LoaderSettings


def damage(shards, folder, tar: str, index: int, fill) -> tuple:
    """A copy of `shards` whose `index`-th JPEG of `tar` is overwritten in place by fill(size) (the tar's size, so
    the manifest's, still holds); the tar's path and the JPEG's name."""
    shutil.copytree(shards, folder)
    path = folder / tar
    with tarfile.open(path) as t:
        member = [m for m in t.getmembers() if m.name.endswith(".jpg")][index]
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(fill(member.size))
    return path, member.name


def run_py(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def checkpoint(demo_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    assert train(demo_shards, workdir, "--max-steps", "1") == 0
    return next((workdir / "checkpoints").glob("step-*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("fill", [bytes, random.Random(0).randbytes], ids=["zeroed", "random"])
def test_eval_names_a_jpeg_that_does_not_parse(demo_shards, checkpoint, tmp_path, fill):
    broken = tmp_path / "broken"
    tar, name = damage(demo_shards, broken, "val-000000.tar", 3, fill)
    # One thread and a batch of 64 (the 24 val images, padded): the decoder parses the batch in two blocks, the
    # broken JPEG's on a thread of DALI's pool, where one that does not parse crashed the process.
    out = run_py("--eval", checkpoint, "--shards", broken, "--device", "cpu", "--threads", "1", "--batch-size", "64")
    assert out.returncode == 2, out.stderr
    one_line(out.stderr, f"run.py: {tar}: {name} does not decode", FIX_HINT.format(dir=broken))


def test_a_position_saved_by_another_graph_is_refused_in_one_line_naming_why(demo_shards):
    """A run's DALI checkpoint restores only into the very same graph: resumed by code whose graph differs (as the
    header check above made it differ from the one before), the refusal names the checkpoint, not the shards."""
    settings = LoaderSettings(batch_size=8, crop_size=64, threads=1)
    with DaliLoader(load_manifest(demo_shards), "train", settings, device="cpu") as ld:
        next(iter(ld))
        state = ld.state_dict()
    with DaliLoader(load_manifest(demo_shards), "train", settings, augment="center", device="cpu") as ld:
        ld.load_state_dict(state)
        with pytest.raises(ShardError) as e:
            next(iter(ld))
    one_line(str(e.value), "DALI cannot restore the loader position saved in this run's checkpoint", "run.py --eval")
    assert str(demo_shards) not in str(e.value)
