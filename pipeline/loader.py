"""DaliLoader: one split of a shard folder as (images, labels) torch batches, sharded per rank, reshuffled per epoch.

Each epoch gets a fresh DALI pipeline whose file order and seeds are functions of (seed, epoch, rank) alone
(pipeline/sharding.py), so any epoch starts without replaying the ones before it, and a mid-epoch resume replays
only that epoch's batches up to the saved step: the state is two integers, the same on every rank (one DALI
checkpoint per rank would not be). Training builds the next epoch's pipeline on a helper thread meanwhile.
"""
from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import types
from tqdm import tqdm

from pipeline import dali
from pipeline.failure import locate, reason, split_source
from pipeline.augment import AUGMENTS, TENCROP_VIEWS, TRAIN_AUGMENTS, lighting_matrix, normalisation
from pipeline.manifest import FIX_HINT, MANIFEST, ShardError, check_crop, load_manifest
from pipeline.sharding import file_order, pipeline_seed, steps_per_epoch, valid_in_step

# DALI has no bfloat16: bfloat16 batches leave DALI as float16 and are cast on the device by torch.
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16, torch.float32: types.FLOAT}


class DaliLoader:
    """Iterable of (images, labels): NCHW views of NHWC memory (channels_last) and int64 labels, on `device`.

    Training augments yield len(self) full batches per epoch on every rank, the last filled up with samples the rank
    already saw that epoch. "center" and "tencrop" yield each sample of the split exactly once over all ranks: the
    last batch of a rank may be short (or empty), so that evaluation counts every image once.
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
        self._tars = {str(s.tar) for s in self.shards}
        self.count = manifest.count(split)
        self.hint = FIX_HINT.format(dir=self.root)
        check_crop(manifest, split, crop_size)
        self.rank, self.world_size, self.seed, self.dtype = rank, world_size, seed, dtype
        self.device = torch.device("cuda", device_id or 0) if device == "cuda" else torch.device("cpu")
        mean, std = normalisation(manifest.rgb_mean, manifest.rgb_std, divide_std)
        self._graph = dict(augment=augment, crop=crop_size, decoder="mixed" if device == "cuda" else "cpu",
                           hw_decoder_load=hw_decoder_load, mean=mean, std=std, dtype=DALI_DTYPES[dtype],
                           lighting=lighting_matrix(manifest.eigval, manifest.eigvec))
        # exec_dynamic: each batch's buffers belong to its outputs until torch frees them, which makes the
        # zero-copy DLPack hand-off safe (DALI's older executor recycles them on the next run()).
        self._run_args = dict(batch_size=batch_size, num_threads=num_threads, prefetch_queue_depth=prefetch,
                              device_id=self.device.index if device == "cuda" else None, exec_dynamic=True)
        self.epoch = self.step = 0  # the position: the next batch yielded is `step` of `epoch`
        self.images_per_s = 0.0  # samples yielded / seconds since this pass over the epoch began, its build included
        self._pipe, self._pipe_at, self._ahead, self._last, self._closed = None, None, None, None, False

    def __len__(self) -> int:
        return steps_per_epoch(self.count, self.batch_size, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch, unless the loader already stands inside it (as after load_state_dict)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "batch_size", "count"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key} {state[key]}, this loader {getattr(self, key)}: "
                                 f"a resumed run would see other batches; resume with the original settings")
        self.epoch, self.step = state["epoch"], state["step"]

    def __iter__(self):
        """The rest of the current epoch; the position moves on as batches are yielded (one pass at a time)."""
        if self._closed:
            raise ValueError("DaliLoader is closed")
        epoch, start, seen = self.epoch, time.perf_counter(), 0
        if self._pipe_at != (self.epoch, self.step):
            self._start()
        if self.augment in TRAIN_AUGMENTS and self._ahead is None:
            self._prepare(self.epoch + 1)
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
        if self._ahead is not None:
            self._ahead["thread"].join()
        self._pipe, self._pipe_at, self._ahead, self._last, self._closed = None, None, None, None, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _files(self, epoch: int) -> tuple[list[str], list[str]]:
        """The epoch's shard files; evaluation keeps the manifest's order, so every epoch reads the same."""
        order = range(len(self.shards))
        if self.augment in TRAIN_AUGMENTS:
            order = file_order(len(self.shards), self.seed, epoch)
        return [str(self.shards[i].tar) for i in order], [str(self.shards[i].index) for i in order]

    def _reader_args(self, epoch: int) -> dict:
        seed = pipeline_seed(self.seed, epoch, self.rank)
        return dict(shard_id=self.rank, num_shards=self.world_size, shuffle=self.augment in TRAIN_AUGMENTS,
                    reader_seed=seed, seed=seed)

    def _build(self, epoch: int):
        pipe = dali.augment_pipeline(*self._files(epoch), **self._graph, **self._reader_args(epoch), **self._run_args)
        try:
            pipe.build()
        except RuntimeError as e:
            raise ShardError(f"{self.root}: DALI cannot read the '{self.split}' shards ({reason(e)}); "
                             f"{self.hint}") from None
        found = pipe.reader_meta(dali.READER)["epoch_size"]
        if found != self.count:
            raise ShardError(f"{self.root / MANIFEST}: {self.count} '{self.split}' samples listed, the index files "
                             f"hold {found}; {self.hint}")
        return pipe

    def _prepare(self, epoch: int) -> None:
        """Build `epoch`'s pipeline on a helper thread while this epoch runs, so that epochs follow without a gap."""
        ahead = {"epoch": epoch}

        def build():
            try:
                ahead["pipe"] = self._build(epoch)
            except Exception as e:  # handed to the main thread when it needs this pipeline
                ahead["error"] = e

        ahead["thread"] = threading.Thread(target=build, name=f"dali-build-epoch-{epoch}", daemon=True)
        ahead["thread"].start()
        self._ahead = ahead

    def _start(self) -> None:
        """Take (or build) this epoch's pipeline and replay it up to the current step (a mid-epoch resume)."""
        self._pipe, ahead, self._ahead = None, self._ahead, None
        if ahead is not None:
            ahead["thread"].join()
        if ahead is not None and ahead["epoch"] == self.epoch:
            if "error" in ahead:
                raise ahead["error"]
            pipe = ahead["pipe"]
        else:
            pipe = self._build(self.epoch)
        self._pipe, self._pipe_at = pipe, (self.epoch, 0)
        replay = range(self.step)
        if self.step >= 100:  # minutes on a large epoch: show it
            replay = tqdm(replay, desc="resuming: replaying batches", unit="batch", leave=False)
        for _ in replay:
            self._run()

    def _run(self):
        epoch, step = self._pipe_at
        try:
            outputs = self._pipe.run()
        except RuntimeError as e:
            self._pipe, self._pipe_at = None, None
            raise self._locate_failure(e, step) from None
        self._pipe_at = (epoch, step + 1)
        return outputs

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, source, *draws = self._run()
        views = len(TENCROP_VIEWS) if self.augment == "tencrop" else 1
        n = self.batch_size if self.augment in TRAIN_AUGMENTS else \
            valid_in_step(self.count, self.rank, self.world_size, self.batch_size, self.step)
        images = _to_torch(images, self.device)
        if views > 1:  # (B, 10, H, W, C) -> (10 B, H, W, C): sample-major, still a view
            images = images.flatten(0, 1)
        images = images[:n * views]
        labels = _to_torch(labels, self.device).view(-1)[:n]
        self._last = (source, draws, n)
        self.step += 1
        if self.step == len(self):  # the pipeline has served its epoch: the next one is built afresh
            self.epoch, self.step, self._pipe, self._pipe_at = self.epoch + 1, 0, None, None
        if self.dtype != images.dtype:
            images = images.to(self.dtype)
        return images.permute(0, 3, 1, 2), labels

    def _locate_failure(self, error: RuntimeError, step: int) -> ShardError:
        """The failed sample, found by replaying this epoch's reader without decoding up to `step`."""
        def reader():
            return dali.read_pipeline(*self._files(self.epoch), **self._reader_args(self.epoch),
                                      batch_size=self.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
        return locate(error, reader, step, self._run_args["prefetch_queue_depth"], self._tars,
                      f"rank {self.rank}'s '{self.split}' shards in epoch {self.epoch} step {step}", self.root, self.hint)


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
