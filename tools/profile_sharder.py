"""Where the sharder's time goes, per image on one core: CPU time per stage of images.prepare, plus tar and hashing.

    python tools/profile_sharder.py [--src DIR] [--resize paper|short:N|none] [--rounds 5]

Without --src it times 200 synthetic ImageNet-like JPEGs (375-500 px, ~110 KB: ImageNet's average file size; the
synthetic texture needs quality 97 for that, at quality 90 it is ~60 KB and decodes faster). CPU time, not wall time,
so other processes on the machine disturb it less; the best of several rounds is reported with the spread.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.writer import images  # noqa: E402
from pipeline.writer.synthetic import make_dataset  # noqa: E402
from pipeline.writer.tars import Sample, build_shard  # noqa: E402

# images.prepare's stages, as the module-level functions it calls, grouped for the report
STAGES = {"decode": "decode (draft)", "to_8bit": "depth + orientation", "upright": "depth + orientation",
          "resample": "crop + resize", "encode": "encode", "sample_pixels": "statistics", "moments": "statistics"}


def timed(fn, group: str, clock: dict):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[group] += time.process_time() - start
    return wrapper


def one_round(src: Path, files: list[Path], resize: images.Resize, quality: int) -> dict:
    """ms per image for each stage group, 'other' (read, RGB conversion, glue), 'tar + sha256' and 'total'."""
    clock = defaultdict(float)
    originals = {name: getattr(images, name) for name in STAGES}
    for name, group in STAGES.items():
        setattr(images, name, timed(originals[name], group, clock))
    try:
        samples, start = [], time.process_time()
        for i, path in enumerate(files):
            r = images.prepare(path, path.stem, resize, quality, 0)
            samples.append(Sample(f"train_{i:08d}", r.jpeg, 0, str(path.relative_to(src))))
        prepared = time.process_time() - start
    finally:
        for name, fn in originals.items():
            setattr(images, name, fn)
    start = time.process_time()
    tar, index = build_shard(samples)
    hashlib.sha256(tar).hexdigest(), hashlib.sha256(index).hexdigest()
    clock["tar + sha256"] = time.process_time() - start
    clock["other"] = prepared - sum(v for k, v in clock.items() if k != "tar + sha256")
    clock["total"] = prepared + clock["tar + sha256"]
    return {k: 1000 * v / len(files) for k, v in clock.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="folder of JPEGs (searched recursively); default: synthetic")
    p.add_argument("--resize", default="paper")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = a.src or make_dataset(Path(tmp), classes=10, per_class=20, val_per_class=0, size_range=(375, 500),
                                    quality=97, seed=1)
        files = sorted(f for f in src.rglob("*") if f.suffix.lower() in images.JPEG_SUFFIXES and f.is_file())
        if not files:
            print(f"profile_sharder: no .jpg or .jpeg files under {src}; point --src at a folder of JPEGs",
                  file=sys.stderr)
            return 2
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
        resize = images.parse_resize(a.resize)
        one_round(src, files[:20], resize, a.quality)  # warm caches and imports
        rounds = sorted((one_round(src, files, resize, a.quality) for _ in range(a.rounds)), key=lambda r: r["total"])
    best = rounds[0]
    print(f"{len(files)} files, {mean_kb:.0f} KB on average, --resize {resize}, best of {a.rounds} rounds "
          f"(totals {rounds[0]['total']:.2f}-{rounds[-1]['total']:.2f} ms)")
    for stage in [*dict.fromkeys(STAGES.values()), "other", "tar + sha256", "total"]:
        print(f"| {stage} | {best.get(stage, 0.0):.2f} |")
    print(f"{1000 / best['total']:.0f} img/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
