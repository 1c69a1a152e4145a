"""A process's place in a torchrun job (Context), the process group, and what every rank must do alike: act on rank
0's decisions, stop after the same step when any of them is sent SIGTERM (what SLURM and Kubernetes send before
the kill) or SIGINT, and end when one fails (a failure every rank waits on is agreed; one met alone ends its rank at
once, and the others, whose collectives lose their peer or whom torchrun stops, follow it quietly)."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class Refused(Exception):
    """Rank 0 refused what the ranks asked it to decide; it reports why, the other ranks exit quietly."""


def agree(rank: int, world: int, decide, refusals: tuple):
    """decide() on rank 0, its answer (or its refusal, one of `refusals`) given to every rank."""
    answer = error = None
    if rank == 0:
        try:
            answer = decide()
        except refusals as e:
            error = e
    if world > 1:
        box = [(answer, error)]
        dist.broadcast_object_list(box, src=0)
        answer, error = box[0]
    if error is not None:
        raise error if rank == 0 else Refused()
    return answer


def alike(ctx: Context, work, failures: tuple):
    """work() on every rank, then one collective: its answer, or on every rank the failure (one of `failures`) of the
    lowest rank that met one: the ranks go on alike, where one leaving the others' collectives would hang them."""
    answer = error = None
    try:
        answer = work()
    except failures as e:
        error = e
    if ctx.world > 1:
        every = [None] * ctx.world
        dist.all_gather_object(every, error)
        error = next((e for e in every if e is not None), None)
    if error is not None:
        raise error
    return answer


def another_failed_first(store: dist.Store | None) -> bool:
    """Records in the group's store that this rank is failing; whether another rank failed before it. A failure of
    one rank alone (its shard's data, its disk) ends that rank at once: the others' collectives then fail (their peer
    has gone) or torchrun stops them, failures that follow from the first one, which says why."""
    return store is not None and store.add("failed", 1) > 1


class Interrupted(BaseException):
    """SIGTERM or SIGINT before the first step ended: nothing trained yet that a checkpoint would keep."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Preemption:
    """Records the first SIGTERM/SIGINT instead of dying; `agreed()` says, after a step, whether any rank got one.
    Before the first step has ended (start-up: loaders, the first batches) a signal raises Interrupted at once."""

    def __init__(self, world: int):
        self.signal = None
        self.stepped = False
        self.world = world
        # The flag the ranks reduce, set and read through NumPy (no torch dispatch per step); one suffices, since an
        # agreement in flight (`_pending`, its work) is waited for before the next one is started.
        self._flag = np.zeros(1, np.int64)
        self._tensor, self._pending = torch.from_numpy(self._flag), None
        # gloo, whatever the training backend: the flag lives on the host, so reading it never waits for a GPU.
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.before = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)}

    def _record(self, signum, frame) -> None:
        # Under torchrun not while a failure is handled: torchrun stops the other ranks when one fails, and each ends on
        # its own failure (which the signal would interrupt), quietly, after the one that says why.
        if not self.stepped and not (self.world > 1 and sys.exc_info()[0] is not None):
            raise Interrupted(signum)
        self.signal = self.signal or signal.Signals(signum)  # torchrun forwards a second one: not a reason to die

    def agreed(self, overlapped: bool = False) -> signal.Signals | None:
        """The signal that stops every rank after this step, or None; a collective under torchrun.

        overlapped (after each training step): the all-reduce started here is read at the next call, so its round
        trip (0.3-0.6 ms on 2 CPU ranks, docs/perf.md) runs beside that step; a signal stops the ranks one step later,
        all after the same one. A plain call (an epoch's end) reads what is in flight and agrees at once."""
        self.stepped = True
        if self.world == 1:
            return self.signal
        answer = 0
        if self._pending is not None:
            self._pending.wait()
            answer, self._pending = int(self._flag[0]), None
        self._flag[0] = int(self.signal or 0)
        work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if overlapped:
            self._pending = work
        else:
            work.wait()
            answer = answer or int(self._flag[0])
        return signal.Signals(answer) if answer else None

    def close(self, drain: bool = True) -> None:
        """drain: wait for the agreement in flight (every rank started it, so it completes: the group must not go with
        it); not after another rank failed, which may never have started it."""
        if self._pending is not None and drain:
            self._pending.wait()
        self._pending = None
        for s, handler in self.before.items():
            signal.signal(s, handler)


@dataclass
class Context:
    rank: int
    world: int
    devices: tuple  # one torch.device, or two with model parallelism


def process_context(device: str, model_parallel: bool, towers: int = 2) -> Context:
    """Rank, world size and this process's devices from torchrun's environment; ValueError if they do not exist."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    per = 2 if model_parallel else 1
    have = torch.cuda.device_count() if device == "cuda" else 1
    if model_parallel and towers != 2:
        raise ValueError("--model-parallel puts the paper's two towers on two devices: drop --towers 1")
    if model_parallel and have < 2 * (local + 1):
        raise ValueError(
            f"--model-parallel needs two {device} devices per process ({2 * (local + 1)} for local "
            f"rank {local}); {have} found: drop --model-parallel or run fewer processes per node"
        )
    if device == "cuda" and have < local + 1:
        raise ValueError(
            f"local rank {local} has no GPU of its own ({have} found): run at most {have} processes per node"
        )
    devices = tuple(
        torch.device("cuda", per * local + i) if device == "cuda" else torch.device("cpu") for i in range(per)
    )
    return Context(rank, world, devices)


def all_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(t)
    return t


def all_gather(t: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    if ctx.world == 1:
        return [t]
    every = [torch.zeros_like(t) for _ in range(ctx.world)]
    dist.all_gather(every, t)
    return every


def barrier(ctx: Context) -> None:
    """Every rank waits here for the others (its host too, under NCCL)."""
    if ctx.world > 1:
        dev = ctx.devices[0]
        dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)


def init_group(backend: str, ctx: Context) -> dist.Store:
    """The process group, its keys apart for each of torchrun's restarts: the store outlives a restarted group, and
    a rank that read the dead group's addresses could not connect (seen with torch 2.13's torchrun --max-restarts).
    Returns the store, this restart's part of it."""
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world)
    return store
