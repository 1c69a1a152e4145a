"""An ordered map over worker processes that fails fast: a killed worker stops the run, Ctrl-C reaches only the parent."""
from __future__ import annotations

import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator

IN_FLIGHT = 4  # chunks queued per worker: enough to keep each busy, few enough that results never pile up


class WorkerDied(Exception):
    """A worker process was killed, typically by the kernel's out-of-memory killer."""


def _ignore_sigint() -> None:
    # Ctrl-C signals the whole process group: without this every worker prints its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(fn: Callable, chunk: list) -> list:
    return [fn(task) for task in chunk]


def ordered_map(fn: Callable, tasks: list, workers: int, chunk: int = 8) -> Iterator:
    """fn(task) for every task, in task order, computed in `workers` processes (in this one when workers is 1).

    multiprocessing.Pool waits forever for the result of a worker that was killed; ProcessPoolExecutor notices the
    death and raises, which becomes WorkerDied here. Close the iterator (or exhaust it) to stop the workers.
    """
    if workers <= 1:
        yield from map(fn, tasks)
        return
    chunks = (tasks[i:i + chunk] for i in range(0, len(tasks), chunk))
    pending = deque()
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    try:
        for c in chunks:
            pending.append(pool.submit(_run, fn, c))
            if len(pending) >= IN_FLIGHT * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool:
        raise WorkerDied("a worker process was killed (by the out-of-memory killer? see dmesg; fewer --workers "
                         "need less memory)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
