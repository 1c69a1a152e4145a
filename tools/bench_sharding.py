"""Sharding on several machines, measured on this one: the wall clock of 2 ranks against 1 on the same synthetic source,
and the time the last rank takes to merge the manifest from the other rank's records, against the bytes sharded (with
what hashing every shard again would cost beside it).

python -m tools.bench_sharding [--images 1536] [--sizes 64 256 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pipeline.writer.build as build
from pipeline.manifest import sha256_file
from pipeline.synthetic import make_dataset
from tools.shard_imagenet import main as shard_main


def sharder(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.shard_imagenet", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def timed(*runs: list[str]) -> float:
    """Wall seconds of sharder processes started together and all finished."""
    start = time.perf_counter()
    procs = [sharder(*argv) for argv in runs]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"bench_sharding: a sharder run failed: {runs}")
    return time.perf_counter() - start


def ranks_against_one(src: Path, tmp: Path, images: int) -> None:
    base = ["--src", str(src), "--splits", "train", "--resize", "paper", "--shard-size", str(max(1, images // 16))]
    rows = [
        ("1 run, --workers 1", [[*base, "--out", str(tmp / "a"), "--workers", "1"]]),
        ("1 run, --workers 2", [[*base, "--out", str(tmp / "b"), "--workers", "2"]]),
        (
            "2 ranks, --workers 1 each",
            [[*base, "--out", str(tmp / "c"), "--workers", "1", "--world-size", "2", "--rank", str(r)] for r in (0, 1)],
        ),
    ]
    print(f"| {images} images (--resize paper) | wall s | images/s |\n|---|---|---|")
    for name, runs in rows:
        seconds = timed(*runs)
        print(f"| {name} | {seconds:.1f} | {images / seconds:.0f} |")
    print(
        f"| each process's fixed cost: a rerun of the finished folder (start, scan, plan) "
        f"| {timed(rows[0][1][0]):.1f} | |"
    )


def timed_merge(argv: list[str]) -> float:
    """Run the sharder in this process; the seconds its merge took."""
    spent, real = [], build.merge

    def merge(*a, **k):
        start = time.perf_counter()
        result = real(*a, **k)
        spent.append(time.perf_counter() - start)
        return result

    build.merge = merge
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert shard_main(argv) == 0
    finally:
        build.merge = real
    return spent[0]


def merge_cost(tmp: Path, sizes: list[int], per_class: int) -> None:
    """The last rank's merge (the other rank's records read, its files checked by their size and mtime) as the shards
    grow 250x in bytes at a fixed shard count; beside it, reading every shard once to hash it."""
    print("| image side | MB sharded | shards | merge s | hashing every shard again s |\n|---|---|---|---|---|")
    for side in sizes:
        src = make_dataset(tmp / f"src{side}", 4, per_class, 0, size_range=(side, side), seed=side)
        out = tmp / f"out{side}"
        argv = ["--src", str(src), "--out", str(out), "--splits", "train", "--resize", "none"]
        argv += ["--shard-size", str(per_class // 4), "--workers", "2", "--world-size", "2"]
        if timed([*argv, "--rank", "0"]) <= 0:
            return
        spent = timed_merge([*argv, "--rank", "1"])
        tars = sorted(out.glob("*.tar"))
        start = time.perf_counter()
        for t in tars:
            sha256_file(t)
        hashing = time.perf_counter() - start
        mb = sum(t.stat().st_size for t in tars) / 1e6
        print(f"| {side} | {mb:.1f} | {len(tars)} | {spent:.3f} | {hashing:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench_sharding.py", description=__doc__)
    p.add_argument("--images", type=int, default=1536, help="train images of the 2-ranks-against-1 source")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="image sides of the merge's sources")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_sharding-") as tmp:
        tmp = Path(tmp)
        src = make_dataset(tmp / "src", 8, args.images // 8, 0, size_range=(300, 500), seed=0, workers=2)
        ranks_against_one(src, tmp, args.images)
        print()
        merge_cost(tmp, args.sizes, per_class=64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
