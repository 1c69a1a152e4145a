"""A process that calls run.py's main again and again (a notebook, a sweep, these tests) gives each run's memory
back: it stays the size it had after its first run."""

import gc

import psutil
import pytest
import torch
from helpers import train

from model import AlexNet


def held() -> tuple[int, int]:
    """This process's (resident memory, address space) in bytes, once Python's own cycles are collected."""
    gc.collect()
    m = psutil.Process().memory_info()
    return m.rss, m.vms


@pytest.mark.slow
def test_runs_in_one_process_give_their_memory_back(demo_shards, tmp_path):
    """A run stopped after a step (the first: imports, kernels, the allocator's first pools), then its continuation
    (DALI restores its reader from the checkpoint) and a new run: the process ends holding less than one model's
    weights more, resident or reserved, than after the first. A run that kept its model alive would fail this (let
    alone its gradients and momentum, 3x that). DALI's readers' default reservations did: the allocator kept 8-16 GB
    of heap after them, of which the later runs dirtied ~2.5 GB (measured; ~30 MB with buffers sized by samples).
    Address space counts too: whether such a heap becomes resident depends on where later allocations land."""
    with torch.device("meta"):
        weights = sum(p.numel() * p.element_size() for p in AlexNet(num_classes=4).parameters())  # 217 MiB
    assert train(demo_shards, tmp_path / "stopped", "--epochs", "1", "--max-steps", "1") == 0
    before = held()
    assert train(demo_shards, tmp_path / "stopped", "--epochs", "1", "--max-steps", "2") == 0
    assert train(demo_shards, tmp_path / "new", "--epochs", "1", "--max-steps", "1") == 0
    rss, vms = (after - b for after, b in zip(held(), before))
    assert rss < weights and vms < weights, (
        f"two runs left the process {rss / 2**20:.0f} MiB more resident, {vms / 2**20:.0f} MiB more reserved"
    )
