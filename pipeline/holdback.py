"""The GPU's side of a batch's life: DALI may reuse a batch's memory once the kernels queued on it have run."""

from __future__ import annotations

import time
from collections import deque

import torch

# Batches whose DALI buffers stay referenced after the caller moved on, until the kernels it queued on them have run;
# the host runs at most this many batches ahead of the GPU before the next batch waits.
HOLD = 4


class HoldBack:
    """DALI outputs held until the GPU has passed the work queued on them, at most HOLD at a time."""

    def __init__(self, device: torch.device):
        self.device, self._held = device, deque()
        # Seconds release() spent holding a host that ran HOLD batches ahead of the GPU: back-pressure, not data wait.
        self.wait_s = 0.0

    def hold(self, outputs) -> None:
        self._held.append([outputs, None])

    def release(self) -> None:
        """The caller has queued its work on the batches yielded so far: mark that point on the stream, and give each
        batch's buffers back to DALI once the GPU has passed its mark."""
        if self._held and self._held[-1][1] is None:
            self._held[-1][1] = torch.cuda.current_stream(self.device).record_event()
        start = time.perf_counter()
        while self._held and (len(self._held) >= HOLD or self._held[0][1].query()):
            self._held.popleft()[1].synchronize()
        self.wait_s += time.perf_counter() - start

    def clear(self) -> None:
        if self._held:  # kernels queued on the last batches may still read them
            torch.cuda.synchronize(self.device)
        self._held.clear()
