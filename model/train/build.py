"""What a run is made of, from its settings: the model (DDP-wrapped under torchrun) and its loaders; and the
evaluation of the one on the other, alike on every rank."""

from __future__ import annotations

from dataclasses import replace

import torch

from model.train.cluster import Context, alike, all_sum
from model.train.config import Config
from model.train.recipe import AMP_DTYPES, count_errors, initialise
from pipeline.manifest import Manifest, ShardError


def build(cfg: Config, ctx: Context, num_classes: int):
    """The model (channels-last, DDP-wrapped under torchrun) and the bare module whose weights are saved."""
    from model import AlexNet, ModelParallelAlexNet

    if cfg.model_parallel:
        raw = ModelParallelAlexNet(devices=tuple(str(d) for d in ctx.devices), num_classes=num_classes)
    else:
        raw = AlexNet(num_classes=num_classes, towers=cfg.towers).to(ctx.devices[0])
    initialise(raw, cfg.init)
    raw = raw.to(memory_format=torch.channels_last)
    if ctx.world == 1:  # under DDP, rank 0's initial weights are broadcast to the others
        return raw, raw
    ids = [ctx.devices[0]] if cfg.device == "cuda" and not cfg.model_parallel else None
    return torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids), raw


def make_loader(cfg: Config, ctx: Context, manifest: Manifest, split: str, augment: str, crop_size: int):
    from pipeline import DaliLoader

    return DaliLoader(
        manifest,
        split,
        replace(cfg, crop_size=crop_size),
        augment=augment,
        device=ctx.devices[0],
        rank=ctx.rank,
        world_size=ctx.world,
        seed=cfg.seed,
        dtype=AMP_DTYPES[cfg.amp] or torch.float32,
    )


def evaluate(model, loader, amp: str, ctx: Context, views: int = 1, check=lambda: None) -> dict:
    """Top-1/top-5 error on val, every rank's share counted once; views=10 averages ten crops' softmax (§4.1).
    A ShardError of any rank's (`check()`'s, then its share's) is raised on every rank, so that they stop alike."""

    def count() -> torch.Tensor:
        check()
        return count_errors(model, loader, amp, views, ctx.devices[0])

    top1, top5, n = all_sum(alike(ctx, count, ShardError), ctx).tolist()
    return {"top1_err": top1 / max(n, 1), "top5_err": top5 / max(n, 1), "samples": n}
