"""Shared fixtures: GPU tests skip cleanly without CUDA; a tiny synthetic ImageNet and its shards, built once."""
from pathlib import Path

import pytest
import torch

from pipeline.writer.synthetic import make_dataset
from tools.shard_imagenet import main as shard_main


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine with: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DEMO_CLASSES, DEMO_PER_CLASS, DEMO_VAL_PER_CLASS, DEMO_SHARD_SIZE = 4, 24, 6, 32


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """ImageNet layout: train/<wnid>/ (4 classes x 24), flat val/ (24) + LOC_val_solution.csv, 96-160 px images."""
    return make_dataset(tmp_path_factory.mktemp("demo") / "imagenet", DEMO_CLASSES, DEMO_PER_CLASS,
                        DEMO_VAL_PER_CLASS, size_range=(96, 160), seed=0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_src) -> Path:
    """demo_src sharded with --resize short:80 --shard-size 32: 3 train shards (96 images), 1 val shard (24)."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    argv = ["--src", str(demo_src), "--out", str(out), "--resize", "short:80",
            "--shard-size", str(DEMO_SHARD_SIZE), "--workers", "1"]
    assert shard_main(argv) == 0
    return out
