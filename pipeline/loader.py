"""DaliLoader: one split of a shard folder as (images, labels) torch batches, sharded per rank, reshuffled per epoch.

One DALI pipeline serves every epoch: its reader moves on to the next epoch by itself (training visits the shard
files in a new order each epoch, the same order on every rank, each rank reading its contiguous share of it, and
shuffles within a buffer), so an epoch boundary costs the training thread nothing; building a pipeline per epoch
held the GIL for ~0.2 s per 100k samples. The position is DALI's own checkpoint of this rank's pipeline (its reader
and its random draws), from which a resumed run continues with exactly the batches the interrupted one would have.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types

from pipeline import dali
from pipeline.augment import (AUGMENTS, TENCROP_VIEWS, TRAIN_AUGMENTS, WINDOW_AUGMENTS, lighting_matrix,
                              normalisation)
from pipeline.failure import locate, reason, split_source
from pipeline.manifest import FIX_HINT, MANIFEST, ShardError, check_crop, load_manifest
from pipeline.sharding import dali_seeds, steps_per_epoch, valid_in_step

# DALI has no bfloat16: bfloat16 batches leave DALI as float16 and are cast on the device by torch.
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16, torch.float32: types.FLOAT}
# GPU: batches whose DALI buffers stay referenced after the caller moved on, until the kernels it queued on them have
# run; the host runs at most this many batches ahead of the GPU before the next batch waits.
HOLD = 4


class DaliLoader:
    """Iterable of (images, labels): NCHW views of NHWC memory (channels_last) and int64 labels, on `device`.

    Training augments yield len(self) full batches per epoch on every rank, the last filled up with samples the rank
    already saw that epoch. "center" and "tencrop" yield each sample of the split exactly once over all ranks: the
    last batch of a rank may be short (or empty), so that evaluation counts every image once.

    On a GPU a batch is DALI's memory, ordered on torch's current stream: torch's kernels wait for DALI, the host does
    not. DALI may reuse it once the kernels queued on that stream before the next batch is asked for have run.
    """

    def __init__(self, shards_dir, split: str, batch_size: int, *, augment: str = "paper", crop_size: int = 224,
                 device: str = "cuda", device_id: int | None = 0, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_threads: int = 4, hw_decoder_load: float = 0.65, prefetch: int = 2,
                 dtype: torch.dtype = torch.float16, divide_std: bool = False):
        _check_args(augment, device, dtype, batch_size, rank, world_size, crop_size, num_threads, prefetch,
                    hw_decoder_load)
        manifest = load_manifest(shards_dir)
        self.root, self.split, self.batch_size, self.augment = manifest.root, split, batch_size, augment
        self.shards = manifest.shards(split)
        self.count = manifest.count(split)
        self.hint = FIX_HINT.format(dir=self.root)
        if augment in WINDOW_AUGMENTS:
            check_crop(manifest, split, crop_size)
        self.rank, self.world_size, self.seed, self.dtype = rank, world_size, seed, dtype
        self.device = torch.device("cuda", device_id or 0) if device == "cuda" else torch.device("cpu")
        self._tars = {str(s.tar) for s in self.shards}
        reader_seed, draw_seed = dali_seeds(seed, rank)
        self._reader = dict(files=[str(s.tar) for s in self.shards], index_files=[str(s.index) for s in self.shards],
                            shard_id=rank, num_shards=world_size, shuffle=augment in TRAIN_AUGMENTS,
                            reader_seed=reader_seed)
        mean, std = normalisation(manifest.rgb_mean, manifest.rgb_std, divide_std)
        self._graph = dict(augment=augment, crop=crop_size, decoder="mixed" if device == "cuda" else "cpu",
                           hw_decoder_load=hw_decoder_load, mean=mean, std=std, dtype=DALI_DTYPES[dtype],
                           lighting=lighting_matrix(manifest.eigval, manifest.eigvec))
        # exec_dynamic: each batch's buffers belong to its outputs, and to the torch tensors made from them, until
        # those are freed (DALI's older executor recycles them on the next run()); see HOLD for the GPU's side.
        self._run_args = dict(batch_size=batch_size, num_threads=num_threads, prefetch_queue_depth=prefetch,
                              device_id=self.device.index if device == "cuda" else None, exec_dynamic=True,
                              seed=draw_seed, enable_checkpointing=True)
        self.epoch = self.step = 0  # the position: the next batch yielded is `step` of `epoch`
        self.images_per_s = 0.0  # samples yielded / seconds since this pass over the epoch began, any build included
        # Seconds next() spent holding a host that ran HOLD batches ahead of the GPU: back-pressure, not data wait.
        self.gpu_wait_s = 0.0
        self._pipe, self._last, self._closed, self._held = None, None, False, deque()
        self._restore = None  # DALI's checkpoint to build the pipeline from, after load_state_dict
        self._anchor = (None, 0)  # (DALI checkpoint, step) of this epoch's start, where a failure's replay begins

    def __len__(self) -> int:
        return steps_per_epoch(self.count, self.batch_size, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Check that `epoch` is where the loader stands: its one pipeline goes through the epochs in order."""
        if epoch != self.epoch:
            raise ValueError(f"set_epoch({epoch}): the loader stands at epoch {self.epoch} step {self.step} and goes "
                             f"through the epochs in order; iterate on, or load_state_dict a saved position")

    def state_dict(self) -> dict:
        """The position, with DALI's checkpoint of this rank's pipeline there (None before the first batch)."""
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._restore
        return {"epoch": self.epoch, "step": self.step, "rank": self.rank, "dali": checkpoint, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, this rank's own (each rank resumes its own pipeline)."""
        for key in ("rank", "seed", "world_size", "batch_size", "count"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key} {state[key]}, this loader {getattr(self, key)}: "
                                 f"a resumed run would see other batches; resume with the original settings")
        if state["dali"] is None and (state["epoch"], state["step"]) != (0, 0):
            raise ValueError(f"loader state at epoch {state['epoch']} step {state['step']} has no DALI checkpoint")
        self._pipe, self._last = None, None
        self.epoch, self.step, self._restore = state["epoch"], state["step"], state["dali"]

    def __iter__(self):
        """The rest of the current epoch; the position moves on as batches are yielded (one pass at a time)."""
        if self._closed:
            raise ValueError("DaliLoader is closed")
        epoch, start, seen = self.epoch, time.perf_counter(), 0
        if self._pipe is None:
            self._pipe = self._build()
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
        tars, keys = [], []
        for i in range(n):
            tar, member = split_source(bytes(np.asarray(source[i])).decode(), self._tars)
            tars.append(Path(tar).name)
            keys.append(member.rsplit(".", 1)[0])
        return {"tar": tars, "key": keys,
                **{name: np.array(t.as_tensor())[:n] for name, t in zip(dali.DRAWS[self.augment], draws)}}

    def close(self) -> None:
        """Stop DALI's threads and free its buffers; safe to call twice."""
        if self._held:  # kernels queued on the last batches may still read them
            torch.cuda.synchronize(self.device)
        self._held.clear()
        self._pipe, self._last, self._closed = None, None, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _build(self):
        """The pipeline, from the start or from the checkpoint load_state_dict gave (DALI skips the reader ahead)."""
        pipe = dali.augment_pipeline(**self._reader, **self._graph, **self._run_args, checkpoint=self._restore)
        try:
            pipe.build()
        except RuntimeError as e:
            raise ShardError(f"{self.root}: DALI cannot read the '{self.split}' shards ({reason(e)}); "
                             f"{self.hint}") from None
        found = pipe.reader_meta(dali.READER)["epoch_size"]
        if found != self.count:
            raise ShardError(f"{self.root / MANIFEST}: {self.count} '{self.split}' samples listed, the index files "
                             f"hold {found}; {self.hint}")
        self._anchor, self._restore = (self._restore, self.step), None
        return pipe

    def _run(self):
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            return self._pipe.run(stream)  # without a stream, the host would wait for each batch to be ready
        except RuntimeError as e:
            try:
                error = self._locate_failure(e)
            finally:
                self.close()  # DALI's pipeline is unusable after a failure
            raise error from None

    def _release(self) -> None:
        """The caller has queued its work on the batches yielded so far: mark that point on the stream, and give each
        batch's buffers back to DALI once the GPU has passed its mark."""
        if self._held and self._held[-1][1] is None:
            self._held[-1][1] = torch.cuda.current_stream(self.device).record_event()
        start = time.perf_counter()
        while self._held and (len(self._held) >= HOLD or self._held[0][1].query()):
            self._held.popleft()[1].synchronize()
        self.gpu_wait_s += time.perf_counter() - start

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            self._release()
        outputs = self._run()
        images, labels, source, *draws = outputs
        views = len(TENCROP_VIEWS) if self.augment == "tencrop" else 1
        n = self.batch_size if self.augment in TRAIN_AUGMENTS else \
            valid_in_step(self.count, self.rank, self.world_size, self.batch_size, self.step)
        images = _to_torch(images, self.device)
        if views > 1:  # (B, 10, H, W, C) -> (10 B, H, W, C): sample-major, still a view
            images = images.flatten(0, 1)
        images = images[:n * views]
        labels = _to_torch(labels, self.device).view(-1)[:n]
        self._last = (source, draws, n)
        if self.device.type == "cuda":  # torch may drop `images` (the float16 one of a bfloat16 batch at once)
            self._held.append([outputs, None])
        self.step += 1
        if self.step == len(self):  # DALI's reader has moved on to the next epoch by itself
            self.epoch, self.step = self.epoch + 1, 0
            self._anchor = (self._pipe.checkpoint(), 0)  # ~0.2 ms
        if self.dtype != images.dtype:
            images = images.to(self.dtype)
        return images.permute(0, 3, 1, 2), labels

    def _locate_failure(self, error: RuntimeError) -> ShardError:
        """The failed sample, found by replaying the reader alone from this epoch's start (or the resumed step)."""
        checkpoint, start = self._anchor

        def reader(restore=None):
            return dali.read_pipeline(**self._reader, batch_size=self.batch_size, num_threads=1, device_id=None,
                                      prefetch_queue_depth=1, enable_checkpointing=True, checkpoint=restore)
        return locate(error, reader, checkpoint, self.step - start, self._run_args["prefetch_queue_depth"], self._tars,
                      f"rank {self.rank}'s '{self.split}' shards in epoch {self.epoch} step {self.step}", self.root,
                      self.hint)


def _to_torch(tensors, device: torch.device) -> torch.Tensor:
    """A DALI batch as a torch tensor without a copy (DLPack), on the device DALI left it on."""
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        return torch.from_dlpack(tensors.as_tensor())


def _check_args(augment, device, dtype, batch_size, rank, world_size, crop_size, num_threads, prefetch,
                hw_decoder_load) -> None:
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}: use one of {', '.join(AUGMENTS)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'cuda' or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; pass device='cpu'")
    if dtype not in DALI_DTYPES:
        raise ValueError(f"dtype={dtype}: use torch.float16, torch.bfloat16 or torch.float32")
    if batch_size < 1 or crop_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size={batch_size}, crop_size={crop_size}, rank={rank}, world_size={world_size}: "
                         f"need batch_size, crop_size >= 1 and 0 <= rank < world_size")
    if num_threads < 1 or prefetch < 1 or not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"num_threads={num_threads}, prefetch={prefetch}, hw_decoder_load={hw_decoder_load}: "
                         f"need num_threads, prefetch >= 1 and hw_decoder_load in [0, 1]")
