"""The DALI graphs: shard bytes in, augmented and normalised NHWC batches out; PipelineSpec builds them for one rank
and one split, from the loader's settings and the manifest.

One definition serves the GPU and the CPU: only the decoder's device changes ("mixed" puts the decoded pixels, and
every operator after the decoder, on the GPU; "cpu" keeps them on the host). The pipeline returns
(images, labels, source_info, *draws), the draws being the per-sample random numbers of the augmentation (DRAWS).
"""

from __future__ import annotations

import itertools

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
from pipeline.settings import LoaderSettings
from pipeline.sharding import dali_seeds
from pipeline.threads import default_threads

READER = "shards"
# Shuffle buffer per rank, in samples (compressed JPEGs: ~110 MB of host memory at the paper's 256x256, ~450 MB at
# full size). The sharder shuffled samples across files, and the reader visits the files in a new order every
# epoch, so a buffer of a few shards' worth mixes classes about as well as a full permutation would.
INITIAL_FILL = 4096
# Bytes DALI reserves for each member of each sample it reads ahead, before it knows the sample's size: none, so that
# each buffer is sized by its sample (and recycled at that size). DALI's default, 1 MiB, reserved 4096 x 2 MiB = 8 GiB
# of heap per training pipeline, mostly untouched; the allocator keeps such a heap once the pipeline is gone, later
# allocations dirty its pages, and a process that ran a resumed run grew by ~2.4 GB with each run after it (measured:
# 0.5 -> 5.5 GB over four short in-process runs; with 0, 0.5 GB). Reading costs the same (CPU loader, within noise).
TENSOR_INIT_BYTES = 0
# Shards are read with read(), not mapped: a tar truncated or rewritten mid-epoch is then an error of DALI's that
# pipeline.failure names in one line, where a mapped one kills the process with SIGBUS. Measured on a loaded 2-core VM
# (35 kB JPEGs): the reader alone takes ~29 us of CPU per sample against ~10 mapped; the CPU loader ~5 % more CPU per
# image and the same images/s within noise.
MMAP = False
SAMPLE = {IMAGE_EXT: types.UINT8, LABEL_EXT: types.INT32}  # the members the loader reads: the JPEG and int32 label
DRAWS = {
    "paper": ("crop_pos_x", "crop_pos_y", "mirror", "alpha"),
    "inception": ("mirror",),
    "center": (),
    "tencrop": (),
}

# DALI has no bfloat16: bfloat16 batches leave DALI as float16 and are cast on the device by torch.
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16, torch.float32: types.FLOAT}


class PipelineSpec:
    """One rank's pipeline over one split, drawn from the settings and the manifest: `build()` makes the augmenting
    pipeline, `labels()` its reader alone reading only the labels (a failure's replay)."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        settings: LoaderSettings,
        *,
        augment: str,
        device: torch.device,
        rank: int,
        world_size: int,
        seed: int,
        dtype: torch.dtype,
    ):
        self.shards = manifest.shards(split)
        if augment in WINDOW_AUGMENTS:  # the other augments resize their crop: any image serves
            check_crop(manifest, split, settings.crop_size)
        self.settings, self.augment, self.dtype, self.rank, self.world_size = settings, augment, dtype, rank, world_size
        self.root, self.split, self.count = manifest.root, split, manifest.count(split)
        self.hint = FIX_HINT.format(dir=self.root)
        self.tars = {str(s.tar) for s in self.shards}
        self.shuffle = augment in TRAIN_AUGMENTS
        self.reader_seed, self.draw_seed = dali_seeds(seed, rank)
        self.mean, self.std = normalisation(manifest.rgb_mean, manifest.rgb_std, settings.divide_std)
        self.lighting = lighting_matrix(manifest.eigval, manifest.eigvec)
        self.decoder, self.device_id = ("mixed", device.index) if device.type == "cuda" else ("cpu", None)

    def read(self, members: dict, mmap: bool = MMAP):
        """read_shards of this rank's share of the split (inside a pipeline definition)."""
        return read_shards(
            [str(s.tar) for s in self.shards],
            [str(s.index) for s in self.shards],
            shard_id=self.rank,
            num_shards=self.world_size,
            shuffle=self.shuffle,
            seed=self.reader_seed,
            members=members,
            mmap=mmap,
        )

    def build(self, restore: bytes | None):
        """The built pipeline, from the start or from DALI's checkpoint `restore` (DALI skips the reader ahead)."""
        try:
            pipe = self._built(restore)
        except RuntimeError as e:
            if restore is not None and self._builds_from_start():
                raise ShardError(
                    f"DALI cannot restore the loader position saved in this run's checkpoint ({reason(e)}): "
                    "another version of pipeline/graphs.py saved it; finish the run with the code that started it, "
                    "or evaluate its checkpoints with run.py --eval"
                ) from None
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

    def _built(self, restore: bytes | None):
        s = self.settings
        # exec_dynamic: each batch's buffers belong to its outputs, and to the torch tensors made from them, until
        # those are freed (DALI's older executor recycles them on the next run()); see HoldBack in pipeline.loader.
        pipe = augment_pipeline(
            self,
            batch_size=s.batch_size,
            num_threads=s.threads or default_threads(),
            prefetch_queue_depth=s.prefetch,
            device_id=self.device_id,
            exec_dynamic=True,
            seed=self.draw_seed,
            enable_checkpointing=True,
            checkpoint=restore,
        )
        pipe.build()
        return pipe

    def _builds_from_start(self) -> bool:
        """Whether the pipeline builds without a checkpoint (a failed restore's diagnosis)."""
        try:
            self._built(None)
        except RuntimeError:
            return False
        return True

    def labels(self):
        """label_pipeline, built from the start: one thread, the batches of the built pipeline's reader."""
        # With checkpointing on, as in build(): DALI's readers may draw another (equally random) order without it.
        pipe = label_pipeline(
            self, batch_size=self.settings.batch_size, num_threads=1, device_id=None, enable_checkpointing=True
        )
        pipe.build()
        return pipe


def check_args(manifest, augment: str, device: torch.device, dtype: torch.dtype, rank: int, world_size: int) -> None:
    """What LoaderSettings cannot check: the arguments of one loader."""
    if not isinstance(manifest, Manifest):
        raise TypeError(f"DaliLoader takes a Manifest, not {manifest!r}: pass pipeline.load_manifest(DIR)")
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}: use one of {', '.join(AUGMENTS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; pass device='cpu'")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device={str(device)!r}: use 'cpu', 'cuda' or 'cuda:N'")
    if dtype not in DALI_DTYPES:
        raise ValueError(f"dtype={dtype}: use torch.float16, torch.bfloat16 or torch.float32")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")


@pipeline_def
def augment_pipeline(spec: PipelineSpec):
    """The loader's pipeline: this rank's samples read, decoded, augmented as spec.augment and normalised."""
    jpegs, labels = spec.read(SAMPLE)
    source = fn.get_property(jpegs, key="source_info")
    jpegs = parsed(jpegs)
    # "mixed" only: the share of JPEGs that the hardware decoder takes (the rest go to CUDA cores), and libjpeg-turbo's
    # "fancy" (interpolating) chroma upsampling, which DALI's CPU decoder and Pillow (the dataset's statistics) use;
    # without it the GPU upsamples chroma by replication and GPU and CPU runs train on different pixels.
    mixed = {"hw_decoder_load": spec.settings.hw_decoder_load, "jpeg_fancy_upsampling": True}
    decode = {"device": spec.decoder, **(mixed if spec.decoder == "mixed" else {})}
    normalise = {"std": spec.std.tolist(), "dtype": DALI_DTYPES[spec.dtype], "output_layout": "HWC"}
    common = {"crop": spec.settings.crop_size, "decode": decode, "normalise": normalise, "mean": spec.mean}
    if spec.augment == "paper":
        images, draws = paper(jpegs, **common, lighting=spec.lighting)
    else:
        images, draws = {"inception": inception, "center": center, "tencrop": tencrop}[spec.augment](jpegs, **common)
    labels = fn.cast(labels, dtype=types.INT64)
    if spec.decoder == "mixed":
        labels = labels.gpu()
    return (images, labels, source, *draws)


@pipeline_def
def label_pipeline(spec: PipelineSpec):
    """The reader of augment_pipeline reading the labels alone: the same samples in the same order, a few bytes each."""
    # Mapped: ~4x as fast as read() here, and the shards' sizes were checked against the manifest just before.
    labels = spec.read({LABEL_EXT: types.INT32}, mmap=True)  # one member: one DataNode
    return fn.get_property(labels, key="source_info")


def read_shards(files, index_files, *, shard_id, num_shards, shuffle, seed, members=SAMPLE, mmap=MMAP):
    """The `members` (extension: DALI type) of this rank's contiguous share of the files, epoch after epoch; each
    epoch's last batch is padded by repeating a sample. shuffle (training): every epoch the files in a new order, drawn
    from `seed` (the same on every rank, so the shares still split the samples), and the samples shuffled in a buffer;
    else the rank's share in file order, the same every epoch."""
    return fn.readers.webdataset(
        paths=files,
        index_paths=index_files,
        ext=list(members),
        dtypes=list(members.values()),
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
        dont_use_mmap=not mmap,
        tensor_init_bytes=TENSOR_INIT_BYTES,
        name=READER,
    )


def parsed(jpegs):
    """The JPEGs, passed on to the decoder only once every header of the batch has parsed."""
    # DALI's decoders split a large batch's header parsing over their threads, and one header that does not parse
    # there (a JPEG zeroed in place, say) may crash the process (SIGSEGV) instead of failing the batch;
    # peek_image_shape fails it cleanly, and the decoder must wait for it: it takes its input through this reshape,
    # a no-op (its shape times 1) whose argument is drawn from the peeked shapes.
    ok = fn.cast(fn.reductions.min(fn.peek_image_shape(jpegs)) > 0, dtype=types.INT64)
    return fn.reshape(jpegs, shape=jpegs.shape() * ok)


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


def reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (DALI puts it after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = [b for a, b in itertools.pairwise(lines) if a.endswith("encountered:")]
    return (after or lines or [type(error).__name__])[0]
