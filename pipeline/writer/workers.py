"""Tasks in worker processes that never outlive the run: the standard library's process pool, with each worker bound
to its parent's life by the kernel and deaf to the terminal's signals, which the parent alone handles.

Why PR_SET_PDEATHSIG and not a watchdog on the parent's pipe or os.getppid: the kernel delivers the signal the moment
the parent dies, however it dies and whatever the worker is doing (blocked in a write, deep in libjpeg, holding the
GIL), with nothing to poll. A pipe is no signal here, since every forked worker holds its siblings' ends of the pool's
pipes, and a polling thread needs the GIL and still waits a period. Linux only, as DALI is.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
# fork, not forkserver or spawn: the worker's parent is then this process (the one PDEATHSIG watches), and it starts
# with the modules already imported instead of importing torch again.
FORK = multiprocessing.get_context("fork")
TERMINAL = {signal.SIGINT, signal.SIGTERM}


class WorkerDied(Exception):
    """A worker process was killed, typically by the kernel's out-of-memory killer."""


def _bind_to_parent(parent: int) -> None:
    """Worker start: die with the parent; leave Ctrl-C and SIGTERM to it (one message, not one per worker)."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # which also drops one that came while blocked (see completed)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL)


def completed(fn: Callable, tasks: list, workers: int) -> Iterator[tuple[int, object]]:
    """(i, fn(tasks[i])) as each task finishes, computed in `workers` processes (in this one when workers is 1).

    A task's exception is raised as itself, a killed worker as WorkerDied. However the iteration ends (done, an error,
    Ctrl-C, close), no worker is left running."""
    if workers <= 1 or len(tasks) <= 1:
        yield from ((i, fn(task)) for i, task in enumerate(tasks))
        return
    before = set(FORK.active_children())
    pool = ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=FORK, initializer=_bind_to_parent, initargs=(os.getpid(),)
    )
    try:
        # The first submit forks the workers: with the terminal's signals blocked, so that a Ctrl-C before a worker has
        # made itself deaf to it waits for that and is dropped, rather than killing the worker with a traceback.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL)
        try:
            futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BrokenProcessPool:
        _stop(pool, before)
        raise WorkerDied(
            "a worker process was killed (by the out-of-memory killer? see dmesg; fewer --workers need less memory)"
        ) from None
    except BaseException:
        _stop(pool, before)
        raise
    pool.shutdown()


def _stop(pool: ProcessPoolExecutor, before: set) -> None:
    """Kill the pool's workers now (shutdown() alone would wait for their tasks to finish), then let the pool's own
    thread reap them: a second thread waiting on the same child could miss its exit and leave it listed as alive."""
    for proc in set(FORK.active_children()) - before:
        proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)
