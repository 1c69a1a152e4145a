"""pipeline/threads.py: DALI's threads leave cores free for the training thread and nvJPEG, and share the node."""

import os

from pipeline import threads


def test_threads_leave_cores_free_share_the_node_and_cap():
    cases = {(16, 1): 8, (12, 1): 8, (8, 1): 6, (64, 8): 6, (26, 2): 8, (2, 1): 1, (2, 4): 1, (128, 1): 8, (3, 1): 1}
    assert {k: threads.dali_threads(*k) for k in cases} == cases


def test_default_reads_the_affinity_and_torchrun_s_local_world(monkeypatch):
    # A 12-core slice of a machine whose cpu_count says 4: the slice is what this process may run on.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads.default_threads() == 8  # 12 - 2, capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads() == 4  # 12 // 2 - 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "48")
    assert threads.default_threads() == 1
