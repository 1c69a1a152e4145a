"""Which samples each rank reads in each epoch: pure functions of (count, rank, world size, seed, epoch).

DALI's reader splits the concatenated samples of its files into `world` contiguous ranges (one per rank) and pads
each rank's last batch; these functions say the same in NumPy so the loader and the tests can count on it.
"""
from __future__ import annotations

import numpy as np


def rank_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the samples that rank reads in an epoch, as DALI's readers split them (shard_id, num_shards)."""
    return count * rank // world, count * (rank + 1) // world


def steps_per_epoch(count: int, batch_size: int, world: int) -> int:
    """Batches every rank yields per epoch: enough for the largest rank's share, so all ranks step together."""
    per_rank = -(-count // world)
    return -(-per_rank // batch_size)


def valid_in_step(count: int, rank: int, world: int, batch_size: int, step: int) -> int:
    """How many samples of this step's batch are the rank's own, the rest being padding (0 to batch_size)."""
    start, stop = rank_range(count, rank, world)
    return int(np.clip(stop - start - step * batch_size, 0, batch_size))


def file_order(num_files: int, seed: int, epoch: int) -> np.ndarray:
    """This epoch's order of the shard files, the same on every rank, so each epoch gives each rank other samples."""
    return np.random.default_rng([seed, epoch]).permutation(num_files)


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """The DALI seed (reader shuffle and augmentation draws) of one rank in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)
