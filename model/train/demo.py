"""run.py --demo: a small synthetic ImageNet (pipeline/synthetic.py), sharded, trained in minutes, then reported.

On the CPU the images are small (shorter side 72, 64x64 crops) and the recipe is the demo's own (cosine, higher lr,
He init, inputs divided by the std), printed like any run's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.manifest import ShardError

DEMO_DATA = {
    "cpu": dict(classes=10, per_class=80, val_per_class=20, size_range=(72, 110), resize="short:72"),
    "cuda": dict(classes=10, per_class=260, val_per_class=50, size_range=(256, 400), resize="short:256"),
}
# divide_std: He init at this lr diverges on 0-255 pixel units (on the CPU demo: loss nan at step 15 of epoch 1).
DEMO_RECIPE = dict(
    lr=0.02, lr_scaling="none", schedule="cosine", warmup_epochs=0.5, init="kaiming", divide_std=True, keep=1
)
DEMO_PRESET = {
    "cpu": dict(DEMO_RECIPE, epochs=6, batch_size=32, crop_size=64, threads=1, log_interval=5),
    "cuda": dict(DEMO_RECIPE, epochs=12, batch_size=128, crop_size=224, log_interval=10),
}


def make_demo_data(cfg) -> None:
    """Generate and shard the demo set into WORKDIR (once); under torchrun rank 0 does, the others wait at a barrier."""
    from pipeline.synthetic import make_dataset
    from pipeline.writer.build import ShardConfig, UsageError, shard
    from pipeline.writer.layout import LayoutError
    from pipeline.writer.workers import WorkerDied

    data = DEMO_DATA[cfg.device]
    if not (Path(cfg.shards) / "manifest.json").exists():
        print(
            f"demo: {data['classes']} synthetic classes, {data['per_class']} train + {data['val_per_class']} val "
            f"images each, resized to {data['resize']}, crops {cfg.crop_size}x{cfg.crop_size} "
            f"(the paper: 1000 classes, 256, 224)"
        )
        src = Path(cfg.workdir) / "images"
        make_dataset(
            src,
            data["classes"],
            data["per_class"],
            data["val_per_class"],
            size_range=data["size_range"],
            workers=os.cpu_count() or 1,
        )
        try:
            code = shard(ShardConfig(src=src, out=Path(cfg.shards), resize=data["resize"], workers=os.cpu_count() or 1))
        except (UsageError, LayoutError, WorkerDied) as e:
            raise ShardError(f"demo: sharding {src}: {e}") from None
        if code:
            raise ShardError(f"demo: sharding {src} rejected images (exit {code}); see the lines above")


def report_demo(cfg, wall_s: float) -> None:
    """What the network learned, from WORKDIR/summary.json, and where the curves and weights are."""
    s = json.loads((Path(cfg.workdir) / "summary.json").read_text())
    print(
        f"\ndemo: in {wall_s:.0f} s ({cfg.device}), AlexNet learned {s['num_classes']} synthetic classes from "
        f"{s['train_samples']} images ({cfg.crop_size}x{cfg.crop_size} crops): on {s['val_samples']} held-out images "
        f"top-1 error {s['val_top1_err']:.1%} (chance {s['chance_top1_err']:.0%}), "
        f"top-5 error {s['val_top5_err']:.1%}."
    )
    print(
        f"demo: curves in {cfg.workdir}/metrics.png, per-epoch numbers in metrics.jsonl, weights in checkpoints/best.pt"
    )
