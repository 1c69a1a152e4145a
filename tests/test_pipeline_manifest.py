"""The manifest is read and checked once per run, and passed down: loaders take the Manifest, not the folder."""

import shutil
from collections import Counter

import pytest

import pipeline.manifest
import run
from pipeline import DaliLoader, load_manifest
from pipeline.settings import LoaderSettings


@pytest.fixture
def hashed(monkeypatch):
    """Counts each file pipeline.manifest hashes: every manifest load hashes every index file of the folder."""
    seen, real = Counter(), pipeline.manifest.sha256_file
    monkeypatch.setattr(pipeline.manifest, "sha256_file", lambda path, *a: seen.update([path.name]) or real(path, *a))
    return seen


# A small CPU run that does not diverge (as in tests/test_train_run.py): 6 steps of 16 images at 64x64.
FAST = [
    "--batch-size",
    "16",
    "--crop-size",
    "64",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--lr",
    "0.02",
    "--lr-scaling",
    "none",
    "--init",
    "kaiming",
    "--divide-std",
]


def test_the_loader_reads_the_manifest_it_is_given(demo_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(demo_shards, folder)
    manifest = load_manifest(folder)
    (folder / "manifest.json").unlink()  # a loader that read the folder again would fail here
    settings = LoaderSettings(batch_size=8, crop_size=48, threads=1)
    with DaliLoader(manifest, "val", settings, augment="center", device="cpu") as ld:
        assert sum(len(labels) for _, labels in ld) == 24
    with pytest.raises(TypeError, match=r"takes a Manifest.*pass pipeline\.load_manifest"):
        DaliLoader(folder, "val", settings, device="cpu")


@pytest.mark.slow
def test_a_training_run_then_its_evaluation_load_the_manifest_once_each(demo_shards, tmp_path, hashed):
    indexes = {p.name for p in demo_shards.glob("*.idx")}
    workdir = tmp_path / "w"
    assert run.main(["--shards", str(demo_shards), "--workdir", str(workdir), *FAST, "--max-steps", "1"]) == 0
    assert hashed == Counter(indexes)  # the train and val loaders over one load
    hashed.clear()
    ckpt = sorted((workdir / "checkpoints").glob("*.pt"))[-1]
    assert (
        run.main(["--eval", str(ckpt), "--shards", str(demo_shards), "--device", "cpu", "--threads", "1", "--ten-crop"])
        == 0
    )  # centre and ten-crop loaders
    assert hashed == Counter(indexes)


def test_the_loaders_print_no_warnings_of_dalis_own(demo_shards, capfd):
    """A line of DALI's on every run (an argument with no effect) teaches users to skim past stderr."""
    manifest = load_manifest(demo_shards)
    settings = LoaderSettings(batch_size=8, crop_size=48, threads=1)
    for split, augment in (("val", "center"), ("train", "paper")):
        with DaliLoader(manifest, split, settings, augment=augment, device="cpu") as ld:
            assert sum(len(labels) for _, labels in ld) == manifest.count(split)
    assert capfd.readouterr().err == ""
