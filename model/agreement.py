"""What every rank of a torchrun job must do alike: act on rank 0's decisions, and stop after the same step when
any of them is sent SIGTERM (what SLURM and Kubernetes send before the kill) or SIGINT."""

from __future__ import annotations

import signal

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
