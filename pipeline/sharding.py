"""Which samples each rank reads in each epoch: pure functions of (count, rank, world size, seed).

DALI's reader splits the concatenated samples of its files into `world` contiguous ranges (one per rank), the files
in a new order every training epoch, and pads each rank's last batch; these functions say the same in NumPy so the
loader and the tests can count on it.
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


def dali_seeds(seed: int, rank: int) -> tuple[int, int]:
    """(reader seed, draw seed) of one rank's pipeline: the reader's is the same on every rank, so that all ranks visit
    the files in one order and split it; the augmentation's draws differ between ranks."""
    reader, draws = (np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0] for key in ((0,), (1, rank)))
    return int(reader & 0x7FFFFFFF), int(draws & 0x7FFFFFFF)
