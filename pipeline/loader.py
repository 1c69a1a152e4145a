"""DaliLoader: one split of a shard folder as (images, labels) torch batches, sharded per rank, reshuffled per epoch.

One DALI pipeline serves every epoch: its reader moves on to the next epoch by itself (training visits the shard
files in a new order each epoch, the same order on every rank, each rank reading its contiguous share of it, and
shuffles within a buffer), so an epoch boundary costs the training thread nothing; building a pipeline per epoch
held the GIL for ~0.2 s per 100k samples. The Position is DALI's own checkpoint of this rank's pipeline (its reader
and its random draws), from which a resumed run continues with exactly the batches the interrupted one would have.
On a GPU, HoldBack keeps each batch's DALI buffers until the kernels queued on them have run.

The graphs and their spec are in pipeline.graphs; a failure's diagnosis and where samples came from, pipeline.failure.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext

import torch

from pipeline.augment import TENCROP_VIEWS, TRAIN_AUGMENTS
from pipeline.failure import batch_info, locate, sources
from pipeline.graphs import DRAWS, PipelineSpec, check_args
from pipeline.manifest import Manifest
from pipeline.settings import LoaderSettings
from pipeline.sharding import steps_per_epoch, valid_in_step


class DaliLoader:
    """Iterable of (images, labels): NCHW views of NHWC memory (channels_last) and int64 labels, on `device`.

    Training augments yield len(self) full batches per epoch on every rank, the last filled up with samples the rank
    already saw that epoch. "center" and "tencrop" yield each sample of the split exactly once over all ranks: the
    last batch of a rank may be short (or empty), so that evaluation counts every image once.

    On a GPU a batch is DALI's memory, ordered on torch's current stream: torch's kernels wait for DALI, the host does
    not. DALI may reuse it once the kernels queued on that stream before the next batch is asked for have run.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        settings: LoaderSettings,
        *,
        augment: str = "paper",
        device: str | torch.device = "cuda",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
    ):
        """`settings` may be any config composed with LoaderSettings (such as the run's): the loader keeps a checked
        copy of its loader fields. `device`: "cpu", "cuda" (device 0) or "cuda:N"."""
        self.settings = LoaderSettings.of(settings)
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device={device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        check_args(manifest, augment, self.device, dtype, rank, world_size)
        self.spec = PipelineSpec(
            manifest,
            split,
            self.settings,
            augment=augment,
            device=self.device,
            rank=rank,
            world_size=world_size,
            seed=seed,
            dtype=dtype,
        )
        self.split, self.batch_size, self.augment, self.dtype = split, self.settings.batch_size, augment, dtype
        self.rank, self.world_size, self.count = rank, world_size, self.spec.count
        self.position = Position(
            len(self), rank=rank, seed=seed, world_size=world_size, batch_size=self.batch_size, count=self.count
        )
        self.images_per_s = 0.0  # samples yielded / seconds since this pass over the epoch began, any build included
        self._hold = HoldBack(self.device)
        self._pipe, self._last, self._closed = None, None, False

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def gpu_wait_s(self) -> float:
        """Seconds next() spent holding a host that ran HOLD batches ahead of the GPU: back-pressure, not data wait."""
        return self._hold.wait_s

    def __len__(self) -> int:
        return steps_per_epoch(self.count, self.batch_size, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Check that `epoch` is where the loader stands: its one pipeline goes through the epochs in order."""
        if epoch != self.epoch:
            raise ValueError(
                f"set_epoch({epoch}): the loader stands at epoch {self.epoch} step {self.step} and goes "
                f"through the epochs in order; iterate on, or load_state_dict a saved position"
            )

    def state_dict(self) -> dict:
        """The position, with DALI's checkpoint of this rank's pipeline there (None before the first batch)."""
        return self.position.state_dict(self._pipe.checkpoint() if self._pipe is not None else None)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, this rank's own (each rank resumes its own pipeline)."""
        self.position.load_state_dict(state)
        self._pipe, self._last = None, None

    def __iter__(self):
        """The rest of the current epoch; the position moves on as batches are yielded (one pass at a time)."""
        if self._closed:
            raise ValueError("DaliLoader is closed")
        epoch, start, seen = self.epoch, time.perf_counter(), 0
        if self._pipe is None:
            self._pipe, self.position.restore = self.spec.build(self.position.restore), None
        while self.epoch == epoch and not self._closed:
            images, labels = self._next_batch()
            seen += labels.numel()
            self.images_per_s = seen / max(time.perf_counter() - start, 1e-9)
            yield images, labels

    @property
    def info(self) -> dict:
        """The batch last yielded: each sample's shard file and key, and the augmentation's draws (NumPy)."""
        if self._last is None:
            return {}
        source, draws, n = self._last
        return batch_info(source, draws, DRAWS[self.augment], n, self.spec.tars)

    def close(self) -> None:
        """Stop DALI's threads and free its buffers; safe to call twice."""
        self._hold.clear()
        self._pipe, self._last, self._closed = None, None, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self):
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            with torch.profiler.record_function("DALI run"):  # a named range in profiles (bench_io --trace)
                return self._pipe.run(stream)  # without a stream, the host would wait for each batch to be ready
        except RuntimeError as e:
            try:
                error = self._locate_failure(e)
            finally:
                self.close()  # DALI's pipeline is unusable after a failure
            raise error from None

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            self._hold.release()
        outputs = self._run()
        images, labels, source, *draws = outputs
        views = len(TENCROP_VIEWS) if self.augment == "tencrop" else 1
        n = (
            self.batch_size
            if self.augment in TRAIN_AUGMENTS
            else valid_in_step(self.count, self.rank, self.world_size, self.batch_size, self.step)
        )
        images = _to_torch(images, self.device)
        if views > 1:  # (B, 10, H, W, C) -> (10 B, H, W, C): sample-major, still a view
            images = images.flatten(0, 1)
        images = images[: n * views]
        labels = _to_torch(labels, self.device).view(-1)[:n]
        self._last = (source, draws, n)
        if self.device.type == "cuda":  # torch may drop `images` (the float16 one of a bfloat16 batch at once)
            self._hold.hold(outputs)
        self.position.advance()
        if self.dtype != images.dtype:
            images = images.to(self.dtype)
        return images.permute(0, 3, 1, 2), labels

    def _locate_failure(self, error: RuntimeError):
        """The failed sample's shard and key: see pipeline.failure."""
        last = sources(self._last[0], self.spec.tars, self._last[2]) if self._last is not None else None
        return locate(
            error,
            self.spec,
            self.epoch * len(self) + self.step,
            self.settings.prefetch,
            last,
            f"rank {self.rank}'s '{self.split}' shards in epoch {self.epoch} step {self.step}",
        )


def _to_torch(tensors, device: torch.device) -> torch.Tensor:
    """A DALI batch as a torch tensor without a copy (DLPack), on the device DALI left it on."""
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        return torch.from_dlpack(tensors.as_tensor())


# What a saved position was drawn with: a loader that differs in any of them would yield other batches.
IDENTITY = ("rank", "seed", "world_size", "batch_size", "count")


class Position:
    """The next batch is `step` of `epoch`; `restore`, the DALI checkpoint to build the pipeline from (None: its start,
    or the pipeline is built already)."""

    def __init__(self, steps_per_epoch: int, **identity):
        self.steps_per_epoch, self.identity = steps_per_epoch, identity
        self.epoch = self.step = 0
        self.restore = None

    def state_dict(self, checkpoint: bytes | None) -> dict:
        """The position with `checkpoint`, DALI's of the running pipeline (None: not built, so `restore`)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "dali": self.restore if checkpoint is None else checkpoint,
            **self.identity,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in IDENTITY:
            if state[key] != self.identity[key]:
                raise ValueError(
                    f"loader state has {key} {state[key]}, this loader {self.identity[key]}: "
                    f"a resumed run would see other batches; resume with the original settings"
                )
        if state["dali"] is None and (state["epoch"], state["step"]) != (0, 0):
            raise ValueError(f"loader state at epoch {state['epoch']} step {state['step']} has no DALI checkpoint")
        self.epoch, self.step, self.restore = state["epoch"], state["step"], state["dali"]

    def advance(self) -> None:
        """One batch yielded; after an epoch's last, DALI's reader has moved on to the next epoch by itself."""
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0


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
