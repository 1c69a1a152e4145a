"""The run's settings (Config), declared once: what run.py parses, saves as config.json and checks a continued run
against."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from model.train.demo import DEMO_PRESET
from model.train.recipe import ComputeSettings, RecipeSettings
from pipeline.cache import CacheSettings
from pipeline.settings import LoaderSettings, above, at_least, option, to_json
from pipeline.writer.build import ShardConfig


@dataclass(kw_only=True)
class Config(RecipeSettings, LoaderSettings, ComputeSettings, CacheSettings):
    """The run"""

    shards: str = option("", "a folder written by tools/shard_imagenet.py, or its s3:// or gs:// URL", resumable=True)
    workdir: str = option(
        "runs/alexnet",
        "the run's folder: config, metrics, checkpoints; one run at a time",
        check=(bool, "a folder's path, not empty"),
        resumable=True,
    )
    towers: int = option(2, "§3.5: two towers, run on one device as a block-diagonal conv; 1: no split", choices=(1, 2))
    model_parallel: bool = option(False, "§3.2: the two towers on two GPUs per process")
    augment: str = option(
        "paper",
        "§4.1: random crops, flips, PCA lighting | inception (Szegedy et al. 2015)",
        choices=("paper", "inception"),
    )
    ten_crop: bool = option(False, "§4.1: at the end, also average the softmax over ten views", resumable=True)
    log_interval: int = option(
        50, "steps between progress lines (the only host syncs of the loop)", check=at_least(1), resumable=True
    )
    checkpoint_minutes: float = option(
        30.0, "also checkpoint this often within an epoch", check=above(0), resumable=True
    )
    keep: int = option(
        3,
        "step checkpoints kept besides best.pt (a restart continues from the newest)",
        check=at_least(1),
        resumable=True,
    )
    max_steps: int = option(
        0, "stop (with a checkpoint) at this global step; 0: run all epochs", check=at_least(0), resumable=True
    )
    resume: bool = option(
        False,
        "continue the run in --workdir, and fail if there is nothing to continue (the "
        "same command without it continues too, or starts)",
        saved=False,
    )
    eval: str = option("", "a checkpoint to evaluate only", saved=False)
    demo: bool = option(
        False, "make a small synthetic ImageNet, shard it, train and evaluate (no download)", saved=False
    )


MIN_CROP = 63  # the least crop AlexNet's stride-4 conv1 and three 3x3/2 poolings leave a pixel of


def alexnet_refuses(cfg: LoaderSettings) -> str | None:
    """What the network refuses of settings each valid on its own (the loader takes any crop): one line, or None."""
    if cfg.crop_size < MIN_CROP:
        return f"--crop-size {cfg.crop_size}: must be at least {MIN_CROP}, the least AlexNet's poolings take"
    return None


# The programs whose saved settings another program's --config may be given: their keys are left out there by name,
# and a key none of them takes is refused as a typo.
SAVED_SETTINGS = {"run.py": Config, "tools/shard_imagenet.py": ShardConfig}


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def demo_preset(given: dict) -> dict:
    """--demo: the demo's recipe for this machine's device, under whatever was given."""
    if not given.get("demo"):
        return {}
    device = ComputeSettings(device=given.get("device", "auto")).resolve_device()["device"]
    return {**DEMO_PRESET[device], "workdir": time.strftime("runs/demo-%Y%m%d-%H%M%S")}


def saved_settings(cfg: Config) -> dict:
    """What config.json and a checkpoint hold: the settings that trained, without one invocation's switches."""
    kept = {f.name for f in fields(Config) if f.metadata["saved"]}
    return {k: v for k, v in to_json(cfg).items() if k in kept}


def read_json(path: Path) -> dict:
    """A config.json the run wrote, or a one-line refusal naming it."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        saved = e
    if not isinstance(saved, dict):
        raise UsageError(f"{path}: damaged ({saved}); remove it to start the run again, or pass another --workdir")
    return saved


def read_saved(saved: dict, where: Path, warn: Callable[[str], None]) -> Config:
    """A saved config as settings: a setting added since it was saved takes its declared default, and the ones this
    code no longer has are named once and left out."""
    known = {f.name for f in fields(Config)}
    gone = sorted(set(saved) - known)
    if gone:
        warn(f"{where}: settings this run.py no longer has, ignored: {', '.join(gone)}")
    return Config(**{k: v for k, v in saved.items() if k in known})


def refuse_changes(cfg: Config, saved: Config, where: Path) -> None:
    """UsageError naming each setting a continued run may not change (declared resumable=False) that differs."""
    changed = [
        f.name
        for f in fields(Config)
        if f.metadata["saved"] and not f.metadata["resumable"] and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {getattr(saved, k)}" for k in changed)
        raise UsageError(f"{where} was trained with {was}; pass the same settings to continue it, or a new --workdir")
