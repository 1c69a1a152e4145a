"""An ordered map over worker processes that fails fast: a killed worker stops the run, Ctrl-C reaches only the parent.

Each worker has a pipe of its own. A worker the kernel kills (the out-of-memory killer's SIGKILL) closes its end, so
the parent's read ends at once. concurrent.futures and multiprocessing.Pool share one result pipe among all workers:
a worker killed while sending a result leaves half a message in it, and the parent waits forever for the rest.
"""
from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.connection import wait
from typing import Callable, Iterator

IN_FLIGHT = 4  # chunks queued per worker, and results held per worker: enough to keep each busy, never piling up


class WorkerDied(Exception):
    """A worker process was killed, typically by the kernel's out-of-memory killer."""


def _serve(fn: Callable, conn) -> None:
    # Ctrl-C signals the whole process group: without this every worker prints its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (job := conn.recv()) is not None:
        index, chunk = job
        try:
            conn.send((index, True, [fn(task) for task in chunk]))
        except Exception as e:  # handed to the parent, which raises it where the result was expected
            conn.send((index, False, e))


def ordered_map(fn: Callable, tasks: list, workers: int, chunk: int = 8) -> Iterator:
    """fn(task) for every task, in task order, computed in `workers` processes (in this one when workers is 1).

    Chunks go to whichever worker has room, and their results are put back in order here; no chunk is sent more than
    IN_FLIGHT * workers past the one awaited. Close the iterator (or exhaust it) to stop the workers.
    """
    if workers <= 1:
        yield from map(fn, tasks)
        return
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    procs, conns = [], []
    try:
        for _ in range(min(workers, len(chunks))):
            conn, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(target=_serve, args=(fn, child), daemon=True)
            proc.start()
            child.close()  # the worker holds the only other end: its death is the parent's end of file
            procs.append(proc)
            conns.append(conn)
        queued, results, sent = dict.fromkeys(conns, 0), {}, 0
        for i in range(len(chunks)):
            while i not in results:
                try:
                    for conn in sorted(conns, key=queued.get):  # the least loaded first
                        if queued[conn] < IN_FLIGHT and sent < min(len(chunks), i + IN_FLIGHT * len(conns)):
                            conn.send((sent, chunks[sent]))
                            queued[conn], sent = queued[conn] + 1, sent + 1
                    for conn in wait(conns):
                        index, ok, result = conn.recv()
                        queued[conn] -= 1
                        results[index] = ok, result
                except (EOFError, OSError):  # end of file, or a broken pipe: that worker is gone
                    raise WorkerDied("a worker process was killed (by the out-of-memory killer? see dmesg; fewer "
                                     "--workers need less memory)") from None
            ok, result = results.pop(i)
            if not ok:
                raise result
            yield from result
    finally:
        for proc in procs:
            proc.kill()
        for proc, conn in zip(procs, conns):
            proc.join()
            conn.close()
