"""Shared fixtures: GPU tests skip cleanly without CUDA; a tiny synthetic ImageNet and its shards, built once; deny.
Shared helpers, imported by test modules with `from conftest import ...`: tree, decode, one_line."""

import builtins
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.synthetic import make_dataset
from tools.shard_imagenet import main as shard_main

# Programs the tests start (python run.py, python tools/...) import this checkout's packages, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine with: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each GPU test's device: its CPU variant runs everywhere, so an API change cannot pass by it unseen."""
    return request.param


DEMO_CLASSES, DEMO_PER_CLASS, DEMO_VAL_PER_CLASS, DEMO_SHARD_SIZE = 4, 24, 6, 32


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """ImageNet layout: train/<wnid>/ (4 classes x 24), flat val/ (24) + LOC_val_solution.csv, 96-160 px images."""
    return make_dataset(
        tmp_path_factory.mktemp("demo") / "imagenet",
        DEMO_CLASSES,
        DEMO_PER_CLASS,
        DEMO_VAL_PER_CLASS,
        size_range=(96, 160),
        seed=0,
    )


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_src) -> Path:
    """demo_src sharded with --resize short:80 --shard-size 32: 3 train shards (96 images), 1 val shard (24)."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    argv = [
        "--src",
        str(demo_src),
        "--out",
        str(out),
        "--resize",
        "short:80",
        "--shard-size",
        str(DEMO_SHARD_SIZE),
        "--workers",
        "1",
    ]
    assert shard_main(argv) == 0
    return out


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A source for the sharder's stop-and-rerun tests, which compare every rerun with one uninterrupted run."""
    return make_dataset(
        tmp_path_factory.mktemp("pristine"), classes=4, per_class=75, val_per_class=8, size_range=(48, 96), seed=11
    )


@pytest.fixture
def deny(monkeypatch):
    """deny(path): take every permission on path away, as chmod 0 does for anyone but root. Root reads and writes
    regardless, so as root the calls that would fail for another user on path are made to fail in the same way."""
    denied = []

    def inside(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and any(
            Path(os.fsdecode(p)).resolve().is_relative_to(d) for d in denied
        )

    def guard(real):
        def call(*a, **k):
            if a and inside(a[0]):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(a[0]))
            return real(*a, **k)

        return call

    def _deny(path: Path) -> None:
        denied.append(path.resolve())
        path.chmod(0)
        if os.geteuid() == 0 and len(denied) == 1:
            for owner, name in ((os, "scandir"), (os, "open"), (builtins, "open")):
                monkeypatch.setattr(owner, name, guard(getattr(owner, name)))

    yield _deny
    for d in denied:
        d.chmod(0o755)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path, with its bytes: two trees compare equal when byte-identical."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def decode(jpeg: bytes) -> np.ndarray:
    """A JPEG's RGB pixels as float64 (Pillow), for comparisons with a tolerance."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)


def one_line(err: str, *says: str, progress: str | None = None) -> str:
    """The one line of a program's error output `err` (lines starting with `progress` aside, carriage returns as line
    ends), having checked that it is one line, no traceback, and says all of `says`."""
    lines = [
        line
        for line in err.replace("\r", "\n").splitlines()
        if line.strip() and not (progress and line.startswith(progress))
    ]
    assert len(lines) == 1 and "Traceback" not in err and all(s in lines[0] for s in says), err
    return lines[0]
