"""Preemption: SIGTERM (what SLURM and Kubernetes send before the kill) or SIGINT ask the run to stop after its
current step; under torchrun every rank stops at the same step, agreed through a CPU process group."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class Preemption:
    """Records the first SIGTERM/SIGINT instead of dying; `agreed()` says, after a step, whether any rank got one."""

    def __init__(self, world: int):
        self.signal = None
        self.world = world
        # gloo, whatever the training backend: the flag lives on the host, so reading it never waits for a GPU.
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.before = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)}

    def _record(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum)  # torchrun forwards a second one: not a reason to die

    def agreed(self) -> signal.Signals | None:
        """The signal that stops every rank after this step, or None; a collective under torchrun."""
        if self.world == 1:
            return self.signal
        flag = torch.tensor([int(self.signal or 0)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(flag)) if flag else None

    def close(self) -> None:
        for s, handler in self.before.items():
            signal.signal(s, handler)
