"""The DALI graphs: shard bytes in, augmented and normalised NHWC batches out.

One definition serves the GPU and the CPU: only the decoder's device changes ("mixed" puts the decoded pixels, and
every operator after the decoder, on the GPU; "cpu" keeps them on the host). Each pipeline returns
(images, labels, source_info, *draws), the draws being the per-sample random numbers of the augmentation (DRAWS).

PipelineSpec is one rank's pipeline over one split: its settings checked, its arguments drawn from the manifest.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipeline.augment import (
    AUGMENTS,
    INCEPTION_AREA,
    INCEPTION_ASPECT,
    LIGHTING_STD,
    TENCROP_VIEWS,
    TRAIN_AUGMENTS,
    WINDOW_AUGMENTS,
    lighting_matrix,
    normalisation,
)
from pipeline.manifest import FIX_HINT, IMAGE_EXT, LABEL_EXT, MANIFEST, Manifest, ShardError, check_crop
from pipeline.sharding import dali_seeds

READER = "shards"
# Shuffle buffer per rank, in samples (compressed JPEGs: ~110 MB of host memory at the paper's 256x256, ~450 MB at
# full size). The sharder shuffled samples across files, and the reader visits the files in a new order every
# epoch, so a buffer of a few shards' worth mixes classes about as well as a full permutation would.
INITIAL_FILL = 4096
DRAWS = {
    "paper": ("crop_pos_x", "crop_pos_y", "mirror", "alpha"),
    "inception": ("mirror",),
    "center": (),
    "tencrop": (),
}


def read_shards(files, index_files, *, shard_id, num_shards, shuffle, seed):
    """(jpegs, labels) of this rank's contiguous share of the files, epoch after epoch; each epoch's last batch is
    padded by repeating a sample. shuffle (training): every epoch the files in a new order, drawn from `seed` (the same
    on every rank, so the shares still split the samples), and the samples shuffled in a buffer; else the rank's
    share in file order, the same every epoch."""
    return fn.readers.webdataset(
        paths=files,
        index_paths=index_files,
        ext=[IMAGE_EXT, LABEL_EXT],
        dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=INITIAL_FILL,
        seed=seed,
        # the file order's own seed: without it DALI draws every run's order from one fixed default
        shuffle_after_epoch=shuffle,
        **({"shuffle_after_epoch_seed": seed} if shuffle else {}),  # else DALI warns it has no effect, every run
        stick_to_shard=not shuffle,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        name=READER,
    )


def paper(jpegs, *, crop, decode, normalise, mean, lighting):
    """§4.1: a random crop x crop patch, mirrored with p = 0.5, and PCA lighting folded into the mean."""
    pos_x = fn.random.uniform(range=(0.0, 1.0))
    pos_y = fn.random.uniform(range=(0.0, 1.0))
    mirror = fn.random.coin_flip(probability=0.5)
    alpha = fn.random.normal(stddev=LIGHTING_STD, shape=3)
    # Region-of-interest decode: only the patch's part of the JPEG is decoded.
    images = fn.decoders.image_crop(jpegs, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y, **decode)
    # (pixel - (mean - offset)) / std adds the lighting offset for free. The per-sample mean, mean - M @ alpha, is
    # one affine map of alpha (coord_transform computes M @ x + T), done on the CPU like the draws themselves.
    lit_mean = fn.coord_transform(fn.reshape(alpha, shape=(1, 3)), M=(-lighting).ravel().tolist(), T=mean.tolist())
    images = fn.crop_mirror_normalize(images, mirror=mirror, mean=fn.reshape(lit_mean, shape=(3,)), **normalise)
    return images, (pos_x, pos_y, mirror, alpha)


def inception(jpegs, *, crop, decode, normalise, mean):
    """Random-resized crop (8-100 % of the area, aspect 3/4-4/3) to crop x crop, mirrored with p = 0.5."""
    images = fn.decoders.image_random_crop(
        jpegs, random_area=INCEPTION_AREA, random_aspect_ratio=INCEPTION_ASPECT, num_attempts=10, **decode
    )
    images = fn.resize(images, size=(crop, crop))
    mirror = fn.random.coin_flip(probability=0.5)
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=mean.tolist(), **normalise), (mirror,)


def center(jpegs, *, crop, decode, normalise, mean):
    """The central crop x crop patch, decoded alone."""
    images = fn.decoders.image_crop(jpegs, crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5, **decode)
    return fn.crop_mirror_normalize(images, mean=mean.tolist(), **normalise), ()


def tencrop(jpegs, *, crop, decode, normalise, mean):
    """§4.1 test time: the four corner and the centre patches and their mirror images, stacked as (10, H, W, C)."""
    images = fn.decoders.image(jpegs, **decode)
    views = [
        fn.crop_mirror_normalize(
            images, crop=(crop, crop), crop_pos_x=x, crop_pos_y=y, mirror=mirror, mean=mean.tolist(), **normalise
        )
        for x, y, mirror in TENCROP_VIEWS
    ]
    return fn.stack(*views), ()


@pipeline_def
def augment_pipeline(
    files,
    index_files,
    *,
    augment: str,
    crop: int,
    decoder: str,
    hw_decoder_load: float,
    mean: np.ndarray,
    std: np.ndarray,
    lighting: np.ndarray,
    dtype,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    reader_seed: int,
):
    jpegs, labels = read_shards(
        files, index_files, shard_id=shard_id, num_shards=num_shards, shuffle=shuffle, seed=reader_seed
    )
    source = fn.get_property(jpegs, key="source_info")
    # "mixed" only: the share of JPEGs that the hardware decoder takes (the rest go to CUDA cores), and libjpeg-turbo's
    # "fancy" (interpolating) chroma upsampling, which DALI's CPU decoder and Pillow (the dataset's statistics) use;
    # without it the GPU upsamples chroma by replication and GPU and CPU runs train on different pixels.
    mixed = {"hw_decoder_load": hw_decoder_load, "jpeg_fancy_upsampling": True}
    decode = {"device": decoder, **(mixed if decoder == "mixed" else {})}
    normalise = {"std": std.tolist(), "dtype": dtype, "output_layout": "HWC"}
    if augment == "paper":
        images, draws = paper(jpegs, crop=crop, decode=decode, normalise=normalise, mean=mean, lighting=lighting)
    else:
        graph = {"inception": inception, "center": center, "tencrop": tencrop}[augment]
        images, draws = graph(jpegs, crop=crop, decode=decode, normalise=normalise, mean=mean)
    labels = fn.cast(labels, dtype=types.INT64)
    if decoder == "mixed":
        labels = labels.gpu()
    return (images, labels, source, *draws)


@pipeline_def
def read_pipeline(files, index_files, *, shard_id: int, num_shards: int, shuffle: bool, reader_seed: int):
    """The reader of augment_pipeline alone: the same samples in the same order, without decoding them."""
    jpegs, _ = read_shards(
        files, index_files, shard_id=shard_id, num_shards=num_shards, shuffle=shuffle, seed=reader_seed
    )
    return jpegs, fn.get_property(jpegs, key="source_info")


def reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (DALI puts it after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = [b for a, b in itertools.pairwise(lines) if a.endswith("encountered:")]
    return (after or lines or [type(error).__name__])[0]


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
        # those are freed (DALI's older executor recycles them on the next run()); see HoldBack in pipeline.loader.
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
        pipe = augment_pipeline(**self.reader_args, **self.graph_args, **self.run_args, checkpoint=restore)
        try:
            pipe.build()
        except RuntimeError as e:
            raise ShardError(
                f"{self.root}: DALI cannot read the '{self.split}' shards ({reason(e)}); {self.hint}"
            ) from None
        found = pipe.reader_meta(READER)["epoch_size"]
        if found != self.count:
            raise ShardError(
                f"{self.root / MANIFEST}: {self.count} '{self.split}' samples listed, the index files "
                f"hold {found}; {self.hint}"
            )
        return pipe

    def reader(self, restore: bytes | None = None):
        """The reader alone, unbuilt: the same samples in the same order, one thread, for a failure's replay."""
        return read_pipeline(
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
