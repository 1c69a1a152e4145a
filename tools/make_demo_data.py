"""Write a synthetic ImageNet-layout folder (pipeline/synthetic.py) for the demo, tests and benchmarks.

python tools/make_demo_data.py --out data/synth --classes 10 --per-class 200 [--quirks]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from model.train.config import SAVED_SETTINGS
from pipeline.settings import SEED, at_least, between, option, parse, show
from pipeline.synthetic import make_dataset


@dataclass
class DemoConfig:
    """The synthetic set"""

    out: Path = option(help="folder to create (must be new or empty)")
    classes: int = option(4, "class folders", check=at_least(1))
    per_class: int = option(50, "training images per class", check=at_least(1))
    val_per_class: int = option(10, "validation images per class", check=at_least(0))
    val_layout: str = option(
        "kaggle",
        "kaggle: flat + LOC_val_solution.csv; devkit: flat + ground truth + meta.mat; folders: class folders",
        choices=("kaggle", "devkit", "folders"),
    )
    quirks: bool = option(False, "add CMYK/PNG/grayscale files and broken ones")
    size_range: tuple[int, int] = option((300, 640), "MIN MAX: image sides, ImageNet's typical ones by default")
    quality: int = option(94, "JPEG quality: ~100 KB at ImageNet sizes, like the real files", check=between(1, 100))
    seed: int = option(0, "random seed", check=SEED, shared=False)
    workers: int = option(os.cpu_count() or 1, "processes", check=at_least(1))


def parse_config(argv) -> DemoConfig:
    cfg, parser = parse(DemoConfig, argv, prog="tools/make_demo_data.py", description=__doc__, others=SAVED_SETTINGS)
    if not 1 <= cfg.size_range[0] <= cfg.size_range[1]:
        parser.error(f"--size-range {cfg.size_range[0]} {cfg.size_range[1]}: give MIN <= MAX, both at least 1")
    return cfg


def main(argv=None) -> int:
    cfg = parse_config(argv)
    print(show(cfg))
    if cfg.out.exists() and any(cfg.out.iterdir()):
        print(f"{cfg.out}: exists and is not empty; pick a new --out", file=sys.stderr)
        return 2
    make_dataset(
        cfg.out,
        cfg.classes,
        cfg.per_class,
        cfg.val_per_class,
        cfg.quirks,
        cfg.size_range,
        cfg.seed,
        cfg.val_layout,
        cfg.quality,
        cfg.workers,
    )
    print(f"wrote {cfg.classes * (cfg.per_class + cfg.val_per_class)} images to {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
