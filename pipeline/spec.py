"""The DALI pipeline a loader runs: its settings checked, its arguments drawn from the manifest, and its build."""

from __future__ import annotations

import torch
from nvidia.dali import types

from pipeline import dali
from pipeline.augment import AUGMENTS, TRAIN_AUGMENTS, WINDOW_AUGMENTS, lighting_matrix, normalisation
from pipeline.failure import reason
from pipeline.manifest import FIX_HINT, MANIFEST, Manifest, ShardError, check_crop
from pipeline.sharding import dali_seeds

# DALI has no bfloat16: bfloat16 batches leave DALI as float16 and are cast on the device by torch.
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16, torch.float32: types.FLOAT}


class PipelineSpec:
    """One rank's pipeline over one split: `build()` makes the augmenting one, `reader()` its reader alone."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        batch_size: int,
        *,
        augment: str,
        crop_size: int,
        device: torch.device,
        rank: int,
        world_size: int,
        seed: int,
        num_threads: int,
        hw_decoder_load: float,
        prefetch: int,
        dtype: torch.dtype,
        divide_std: bool,
    ):
        shards = manifest.shards(split)
        if augment in WINDOW_AUGMENTS:  # the other augments resize their crop: any image serves
            check_crop(manifest, split, crop_size)
        self.root, self.split, self.count, self.batch_size = manifest.root, split, manifest.count(split), batch_size
        self.hint = FIX_HINT.format(dir=self.root)
        self.tars = {str(s.tar) for s in shards}
        reader_seed, draw_seed = dali_seeds(seed, rank)
        self.reader_args = dict(
            files=[str(s.tar) for s in shards],
            index_files=[str(s.index) for s in shards],
            shard_id=rank,
            num_shards=world_size,
            shuffle=augment in TRAIN_AUGMENTS,
            reader_seed=reader_seed,
        )
        mean, std = normalisation(manifest.rgb_mean, manifest.rgb_std, divide_std)
        cuda = device.type == "cuda"
        self.graph_args = dict(
            augment=augment,
            crop=crop_size,
            decoder="mixed" if cuda else "cpu",
            hw_decoder_load=hw_decoder_load,
            mean=mean,
            std=std,
            dtype=DALI_DTYPES[dtype],
            lighting=lighting_matrix(manifest.eigval, manifest.eigvec),
        )
        # exec_dynamic: each batch's buffers belong to its outputs, and to the torch tensors made from them, until
        # those are freed (DALI's older executor recycles them on the next run()); see pipeline.holdback.
        self.run_args = dict(
            batch_size=batch_size,
            num_threads=num_threads,
            prefetch_queue_depth=prefetch,
            device_id=device.index if cuda else None,
            exec_dynamic=True,
            seed=draw_seed,
            enable_checkpointing=True,
        )

    def build(self, restore: bytes | None):
        """The built pipeline, from the start or from DALI's checkpoint `restore` (DALI skips the reader ahead)."""
        pipe = dali.augment_pipeline(**self.reader_args, **self.graph_args, **self.run_args, checkpoint=restore)
        try:
            pipe.build()
        except RuntimeError as e:
            raise ShardError(
                f"{self.root}: DALI cannot read the '{self.split}' shards ({reason(e)}); {self.hint}"
            ) from None
        found = pipe.reader_meta(dali.READER)["epoch_size"]
        if found != self.count:
            raise ShardError(
                f"{self.root / MANIFEST}: {self.count} '{self.split}' samples listed, the index files "
                f"hold {found}; {self.hint}"
            )
        return pipe

    def reader(self, restore: bytes | None = None):
        """The reader alone, unbuilt: the same samples in the same order, one thread, for a failure's replay."""
        return dali.read_pipeline(
            **self.reader_args,
            batch_size=self.batch_size,
            num_threads=1,
            device_id=None,
            prefetch_queue_depth=1,
            enable_checkpointing=True,
            checkpoint=restore,
        )


def check_args(
    manifest, augment, device, dtype, batch_size, rank, world_size, crop_size, num_threads, prefetch, hw_decoder_load
) -> None:
    if not isinstance(manifest, Manifest):
        raise TypeError(f"DaliLoader takes a Manifest, not {manifest!r}: pass pipeline.load_manifest(DIR)")
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}: use one of {', '.join(AUGMENTS)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: use 'cuda' or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; pass device='cpu'")
    if dtype not in DALI_DTYPES:
        raise ValueError(f"dtype={dtype}: use torch.float16, torch.bfloat16 or torch.float32")
    if batch_size < 1 or crop_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"batch_size={batch_size}, crop_size={crop_size}, rank={rank}, world_size={world_size}: "
            f"need batch_size, crop_size >= 1 and 0 <= rank < world_size"
        )
    if num_threads < 1 or prefetch < 1 or not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(
            f"num_threads={num_threads}, prefetch={prefetch}, hw_decoder_load={hw_decoder_load}: "
            f"need num_threads, prefetch >= 1 and hw_decoder_load in [0, 1]"
        )
