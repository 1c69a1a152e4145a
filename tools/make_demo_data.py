"""Write a synthetic ImageNet-layout folder (pipeline/writer/synthetic.py) for the demo, tests and benchmarks.

    python tools/make_demo_data.py --out data/synth --classes 10 --per-class 200 [--quirks]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.writer.synthetic import make_dataset  # noqa: E402


@dataclass
class DemoConfig:
    out: Path
    classes: int = 4
    per_class: int = 50
    val_per_class: int = 10
    val_layout: str = "kaggle"  # kaggle: flat + LOC_val_solution.csv; devkit: flat + ground truth + meta.mat; folders
    quirks: bool = False
    size_range: tuple[int, int] = (300, 640)  # ImageNet's typical sides
    quality: int = 94  # ~100 KB at ImageNet sizes, like the real files
    seed: int = 0
    workers: int = os.cpu_count() or 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=DemoConfig.classes)
    p.add_argument("--per-class", type=int, default=DemoConfig.per_class)
    p.add_argument("--val-per-class", type=int, default=DemoConfig.val_per_class)
    p.add_argument("--val-layout", choices=("kaggle", "devkit", "folders"), default=DemoConfig.val_layout)
    p.add_argument("--quirks", action="store_true", help="add CMYK/PNG/grayscale files and broken ones")
    p.add_argument("--size-range", type=int, nargs=2, default=DemoConfig.size_range, metavar=("MIN", "MAX"))
    p.add_argument("--quality", type=int, default=DemoConfig.quality)
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--workers", type=int, default=DemoConfig.workers)
    a = p.parse_args(argv)
    cfg = DemoConfig(a.out, a.classes, a.per_class, a.val_per_class, a.val_layout, a.quirks, tuple(a.size_range),
                     a.quality, a.seed, a.workers)
    print(cfg)
    if cfg.out.exists() and any(cfg.out.iterdir()):
        print(f"{cfg.out}: exists and is not empty; pick a new --out", file=sys.stderr)
        return 2
    make_dataset(cfg.out, cfg.classes, cfg.per_class, cfg.val_per_class, cfg.quirks, cfg.size_range, cfg.seed,
                 cfg.val_layout, cfg.quality, cfg.workers)
    print(f"wrote {cfg.classes * (cfg.per_class + cfg.val_per_class)} images to {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
