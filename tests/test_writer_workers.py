"""pipeline/writer/workers.py: every task's result once, a task's own error raised as itself, a killed worker as
WorkerDied (never a hang), and no worker left running however the iteration ends."""

import multiprocessing
import os
import signal

import pytest

from pipeline.writer import workers
from pipeline.writer.workers import WorkerDied, completed


def square(n: int) -> int:
    return n * n


def fails_on_five(n: int) -> int:
    if n == 5:
        raise FileNotFoundError(2, "No such file or directory", f"photo-{n}.jpg")
    return n


def dies_on_ten(n: int) -> int:
    if n == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@pytest.mark.parametrize("workers", [1, 3])
def test_every_result_once_under_its_task(workers):
    assert sorted(completed(square, list(range(40)), workers)) == [(n, n * n) for n in range(40)]


def test_a_tasks_own_error_is_raised_as_itself_and_the_workers_are_stopped():
    with pytest.raises(FileNotFoundError, match=r"photo-5\.jpg"):
        list(completed(fails_on_five, list(range(20)), 2))
    assert multiprocessing.active_children() == []


def test_a_killed_worker_is_worker_died_and_the_others_are_stopped():
    with pytest.raises(WorkerDied, match="out-of-memory killer"):
        list(completed(dies_on_ten, list(range(40)), 2))
    assert multiprocessing.active_children() == []


def test_leaving_the_loop_early_stops_the_workers():
    results = completed(square, list(range(40)), 2)
    next(results)
    results.close()
    assert multiprocessing.active_children() == []


def test_ctrl_c_reaching_a_worker_before_its_start_up_is_left_to_the_parent(monkeypatch):
    """The terminal sends Ctrl-C to every process of its group: one that lands in a worker just forked, before it has
    made itself deaf to it, must not kill it (a traceback, a broken pool) but be dropped, as it is once started."""
    real = workers._bind_to_parent

    def signalled_first(parent: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real(parent)

    monkeypatch.setattr(workers, "_bind_to_parent", signalled_first)
    assert sorted(completed(square, list(range(8)), 2)) == [(n, n * n) for n in range(8)]
    assert multiprocessing.active_children() == []
