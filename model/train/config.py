"""The run's settings (Config), declared once: what run.py parses, saves as config.json and checks a continued run
against."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from model.train.demo import DEMO_PRESET
from model.train.recipe import ComputeSettings, RecipeSettings
from pipeline.cache import CacheSettings
from pipeline.settings import LoaderSettings, above, at_least, option


@dataclass(kw_only=True)
class Config(RecipeSettings, LoaderSettings, ComputeSettings, CacheSettings):
    """The run"""

    shards: str = option("", "a folder written by tools/shard_imagenet.py, or its s3:// or gs:// URL")
    workdir: str = option("runs/alexnet", "the run's folder: config, metrics, checkpoints; one run at a time")
    towers: int = option(2, "§3.5: two towers, run on one device as a block-diagonal conv; 1: no split", choices=(1, 2))
    model_parallel: bool = option(False, "§3.2: the two towers on two GPUs per process")
    augment: str = option(
        "paper",
        "§4.1: random crops, flips, PCA lighting | inception (Szegedy et al. 2015)",
        choices=("paper", "inception"),
    )
    ten_crop: bool = option(False, "§4.1: at the end, also average the softmax over ten views")
    log_interval: int = option(50, "steps between progress lines (the only host syncs of the loop)", check=at_least(1))
    checkpoint_minutes: float = option(30.0, "also checkpoint this often within an epoch", check=above(0))
    keep: int = option(
        3, "step checkpoints kept besides best.pt (a restart continues from the newest)", check=at_least(1)
    )
    max_steps: int = option(0, "stop (with a checkpoint) at this global step; 0: run all epochs", check=at_least(0))
    resume: bool = option(
        False,
        "continue the run in --workdir, and fail if there is nothing to continue (the "
        "same command without it continues too, or starts)",
    )
    eval: str = option("", "a checkpoint to evaluate only")
    demo: bool = option(False, "make a small synthetic ImageNet, shard it, train and evaluate (no download)")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


# Settings a --resume may change; anything else must match the run being continued.
RESUMABLE = {
    "shards",
    "cache_dir",
    "workdir",
    "lr",
    "epochs",
    "max_steps",
    "resume",
    "log_interval",
    "checkpoint_minutes",
    "keep",
    "ten_crop",
    "compile",
    "eval",
    "threads",
    "prefetch",
}


def demo_preset(given: dict) -> dict:
    """--demo: the demo's recipe for this machine's device, under whatever was given."""
    if not given.get("demo"):
        return {}
    device = ComputeSettings(device=given.get("device", "auto")).resolve_device()["device"]
    return {**DEMO_PRESET[device], "workdir": time.strftime("runs/demo-%Y%m%d-%H%M%S")}


def refuse_changes(cfg: Config, saved: dict, where: Path) -> None:
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in changed)
        raise UsageError(f"{where} was trained with {was}; pass the same settings to continue it, or a new --workdir")
