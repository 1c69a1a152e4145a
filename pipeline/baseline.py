"""What bench_io compares against: plain DataLoader workers + webdataset + Pillow, doing the paper's augmentation.

Each worker process decodes a JPEG with Pillow, takes a random crop_size square and flips it with p = 0.5 (paper
§4.1), adds the PCA lighting offset, subtracts the mean (§2) and, with divide_std, divides by the std (as DaliLoader
does) in NumPy float32, the way a hand-written torchvision-style transform does it; batches are collated in the
workers and made channels-last on the device.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.augment import LIGHTING_STD, crop_anchor, lighting_offset, normalisation
from pipeline.manifest import Manifest

SHUFFLE_BUFFER = 1000  # samples each worker mixes, webdataset's usual order of magnitude


def augment(
    image: Image.Image,
    rng: np.random.Generator,
    size: int,
    mean: np.ndarray,
    std: np.ndarray,
    eigval: np.ndarray,
    eigvec: np.ndarray,
) -> np.ndarray:
    """Random size x size crop, flip with p = 0.5, lighting, then (pixel - mean) / std: float32 CHW.

    Draws from rng in this order: crop position x, y (uniform in [0, 1), placed as DALI places them), flip,
    the three lighting alphas.
    """
    w, h = image.size
    left, top = crop_anchor(rng.random(), w, size), crop_anchor(rng.random(), h, size)
    image = image.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    alpha = rng.normal(0.0, LIGHTING_STD, 3)
    out = np.asarray(image, np.float32) - (mean - lighting_offset(alpha, eigval, eigvec)).astype(np.float32)
    out /= std.astype(np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class _Transform:
    """Per-sample work done inside a worker; its generator is seeded there, from the DataLoader's worker seed."""

    def __init__(self, size, mean, std, eigval, eigvec):
        self.args = (size, mean, std, eigval, eigvec)
        self.rng = None

    def __call__(self, sample):
        if self.rng is None:
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng(info.seed if info else torch.initial_seed())
        jpeg, cls = sample
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        return torch.from_numpy(augment(image, self.rng, *self.args)), int(cls)


def baseline_loader(
    m: Manifest,
    batch_size: int,
    *,
    crop_size: int = 224,
    workers: int = 4,
    seed: int = 0,
    divide_std: bool = False,
    pin_memory: bool = False,
    start: str | None = None,
) -> torch.utils.data.DataLoader:
    """An endless DataLoader over the manifest's training shards (shards resampled, samples shuffled in each worker).
    `start`: how its workers start (a multiprocessing start method; "forkserver" in a process already running threads,
    such as DALI's, which a fork would copy mid-work)."""
    import webdataset as wds

    paths = [str(s.tar) for s in m.shards("train")]
    transform = _Transform(crop_size, *normalisation(m.rgb_mean, m.rgb_std, divide_std), m.eigval, m.eigvec)
    # Not wds.WebDataset: it opens a shard at urlparse(path).path, so a '#' in a folder name cuts the path short.
    # tarfile_to_samples opens a path without a URL scheme as the plain file it is.
    dataset = wds.DataPipeline(
        # Seeded from each worker's seed (the DataLoader's generator): one seed gives one stream of batches.
        wds.ResampledShards(paths, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(SHUFFLE_BUFFER, seed=seed),
        wds.to_tuple("jpg", "cls"),
        wds.map(transform),
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=start if workers else None,
    )


def device_batches(loader: torch.utils.data.DataLoader, device: str, dtype: torch.dtype):
    """Yield (images, labels) as DaliLoader does: NCHW channels-last `dtype` images and int64 labels on `device`."""
    for images, labels in loader:
        images = images.to(device, non_blocking=True).to(dtype, memory_format=torch.channels_last)
        yield images, labels.to(device, non_blocking=True)
