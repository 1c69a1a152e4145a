"""pipeline/writer/pool.py: results in task order whatever order the workers finish in; a task's own error is raised
as itself; a killed worker is WorkerDied, never a hang."""
import os
import signal
import time

import pytest

from pipeline.writer.pool import WorkerDied, ordered_map


def slow_square(n: int) -> int:
    time.sleep(0.02 if n % 7 == 0 else 0.0)  # uneven work: later chunks finish first
    return n * n


def fails_on_five(n: int) -> int:
    if n == 5:
        raise FileNotFoundError(2, "No such file or directory", f"photo-{n}.jpg")
    return n


def dies_on_ten(n: int) -> int:
    if n == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@pytest.mark.parametrize("workers,chunk", [(1, 8), (2, 1), (3, 4)])
def test_results_come_in_task_order(workers, chunk):
    assert list(ordered_map(slow_square, list(range(60)), workers, chunk)) == [n * n for n in range(60)]


def test_a_tasks_own_error_is_raised_as_itself_not_as_a_dead_worker():
    with pytest.raises(FileNotFoundError, match="photo-5.jpg"):
        list(ordered_map(fails_on_five, list(range(20)), 2, chunk=2))


def test_a_killed_worker_stops_the_map_at_once():
    start = time.monotonic()
    with pytest.raises(WorkerDied, match="out-of-memory killer"):
        list(ordered_map(dies_on_ten, list(range(40)), 2, chunk=3))
    assert time.monotonic() - start < 10
