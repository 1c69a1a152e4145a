"""Where the sharder's time goes, per image on one core: CPU time per stage of images.prepare, plus tar and hashing;
then the real sharder on the same files with --workers 1 and --workers N: wall clock, speedup, and the main process's
share of the CPU time (what it would cost on 16 and 64 cores).

    python tools/profile_sharder.py [--src DIR] [--resize paper|short:N|none] [--rounds 5] [--workers 2]

Without --src it times 200 synthetic ImageNet-like JPEGs (375-500 px, ~110 KB: ImageNet's average file size; the
synthetic texture needs quality 97 for that, at quality 90 it is ~60 KB and decodes faster). CPU time, not wall time,
so other processes on the machine disturb it less; the best of several rounds is reported with the spread.
"""

from __future__ import annotations

import contextlib
import io
import resource
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from model.train.config import SAVED_SETTINGS
from pipeline.settings import at_least, between, option, parse
from pipeline.synthetic import make_dataset
from pipeline.writer import images
from pipeline.writer.build import ShardConfig, resize_named, shard
from pipeline.writer.tars import Sample, write_shard

# images.prepare's stages, as the module-level functions it calls, grouped for the report
STAGES = {
    "decode": "decode (draft)",
    "to_8bit": "depth + orientation",
    "upright": "depth + orientation",
    "resample": "crop + resize",
    "encode": "encode",
    "sample_pixels": "statistics",
    "moments": "statistics",
}


@dataclass
class ProfileConfig:
    """What is profiled"""

    src: Path | None = option(None, "folder of JPEGs (searched recursively); default: synthetic")
    resize: str = option(
        "paper", "the sharder's --resize", check=(resize_named, "paper, short:N with N at least 1, or none")
    )
    quality: int = option(95, "the sharder's --quality", check=between(1, 100))
    rounds: int = option(5, "rounds timed; the best is reported with the spread", check=at_least(1))
    workers: int = option(2, "the sharder's wall clock with 1 and with this many workers", check=at_least(1))


def timed(fn, group: str, clock: dict):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[group] += time.process_time() - start

    return wrapper


def one_round(src: Path, files: list[Path], resize: images.Resize, quality: int, tmp: Path) -> dict:
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
    write_shard(tmp, "train-000000", samples)  # tarfile into a temporary file, fsync, rename, sha256 read back
    clock["tar + sha256"] = time.process_time() - start
    clock["other"] = prepared - sum(v for k, v in clock.items() if k != "tar + sha256")
    clock["total"] = prepared + clock["tar + sha256"]
    return {k: 1000 * v / len(files) for k, v in clock.items()}


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def sharder_run(
    src: Path, out: Path, workers: int, resize: str, quality: int, shard_size: int
) -> tuple[float, float, float]:
    """One real run of the sharder into `out`: (wall seconds, CPU seconds of this process, CPU seconds of workers)."""
    cfg = ShardConfig(
        src=src, out=out, splits=("train",), resize=resize, quality=quality, shard_size=shard_size, workers=workers
    )
    before = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if shard(cfg) != 0:
            raise SystemExit(f"profile_sharder: the sharder rejected files of {src}; run tools/shard_imagenet.py on it")
    after = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    return tuple(b - a for a, b in zip(before, after))


def scaling(src: Path, n: int, workers: int, resize: str, quality: int, rounds: int, tmp: Path) -> None:
    """Wall clock of --workers 1 and --workers N (best of the rounds), and the main process's CPU share at N."""
    shard_size = max(1, n // (4 * workers))  # a few shards per worker, as ImageNet's 257 shards give 16 workers
    best = {}
    for w in (1, workers):
        runs = [sharder_run(src, tmp / f"w{w}-{r}", w, resize, quality, shard_size) for r in range(rounds)]
        best[w] = min(runs)
    (wall1, _, _), (wall, main_cpu, worker_cpu) = best[1], best[workers]
    share = main_cpu / (main_cpu + worker_cpu)
    print(
        f"sharder on {n} images, --shard-size {shard_size}, best of {rounds} runs: --workers 1 {wall1:.2f} s "
        f"({n / wall1:.0f} img/s), --workers {workers} {wall:.2f} s ({n / wall:.0f} img/s): "
        f"speedup {wall1 / wall:.2f}"
    )
    print(
        f"main process at --workers {workers}: {main_cpu:.2f} s CPU of {main_cpu + worker_cpu:.2f} s "
        f"({100 * share:.1f}%, {1000 * main_cpu / n:.2f} ms per image)"
    )
    # An upper bound: all of the main process's time counted as per image, though forking and the manifest do not grow
    per_core = n / worker_cpu  # img/s per busy worker core
    for cores in (16, 64):
        print(
            f"  at {cores} cores ({cores * per_core:.0f} img/s): the main process needs at most "
            f"{cores * per_core * main_cpu / n:.2f} of a core"
        )


def main(argv=None) -> int:
    try:
        a, parser = parse(
            ProfileConfig, argv, prog="tools/profile_sharder.py", description=__doc__, others=SAVED_SETTINGS
        )
        if a.src is not None and not a.src.is_dir():
            parser.error(f"--src {a.src}: no such folder")
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = a.src or make_dataset(
            tmp / "src", classes=10, per_class=20, val_per_class=0, size_range=(375, 500), quality=97, seed=1
        )
        files = sorted(f for f in src.rglob("*") if f.suffix.lower() in images.JPEG_SUFFIXES and f.is_file())
        if not files:
            print(
                f"profile_sharder: no .jpg or .jpeg files under {src}; point --src at a folder of JPEGs",
                file=sys.stderr,
            )
            return 2
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
        resize = images.parse_resize(a.resize)
        one_round(src, files[:20], resize, a.quality, tmp)  # warm caches and imports
        rounds = sorted(
            (one_round(src, files, resize, a.quality, tmp) for _ in range(a.rounds)), key=lambda r: r["total"]
        )
        best = rounds[0]
        print(
            f"{len(files)} files, {mean_kb:.0f} KB on average, --resize {resize}, best of {a.rounds} rounds "
            f"(totals {rounds[0]['total']:.2f}-{rounds[-1]['total']:.2f} ms)"
        )
        for stage in [*dict.fromkeys(STAGES.values()), "other", "tar + sha256", "total"]:
            print(f"| {stage} | {best.get(stage, 0.0):.2f} |")
        print(f"{1000 / best['total']:.0f} img/s per core")
        if (src / "train").is_dir():
            scaling(src, len(list((src / "train").rglob("*.*"))), a.workers, a.resize, a.quality, a.rounds, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
