"""How many CPU threads a DALI pipeline gets: one rule for run.py and tools/bench_io.py."""

from __future__ import annotations

import os

# Cores each process leaves to others: the Python thread that launches the training kernels, and nvJPEG's own
# pinned host threads, which DALI starts beside its pool. Taking every core starves the launching thread.
FREE_CORES = 2
# On one H100 (docs/perf.md, "DALI's loader alone on one H100", full-size shards) 8 threads fed as much as 16
# (22,455 and 22,225 img/s): more only add contention. .ci/gpu measures 8 against 16 on the H200 to revisit this.
MAX_THREADS = 8


def dali_threads(cores: int, processes: int) -> int:
    """Threads per process: its share of the node's cores, less FREE_CORES, capped at MAX_THREADS, at least 1."""
    return max(1, min(MAX_THREADS, cores // max(1, processes) - FREE_CORES))


def default_threads() -> int:
    """dali_threads for this process: the cores it may run on, shared by torchrun's processes on this node."""
    return dali_threads(len(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
