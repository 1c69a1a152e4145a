"""Sharding on several machines, measured on this one: the wall clock of 2 ranks against 1 on the same synthetic source,
and the time the last rank takes to merge the manifest from the other rank's records, against the bytes sharded, into a
folder and into a bucket on moto_server (with what reading every shard again would cost beside it).

python -m tools.bench_sharding [--images 1536] [--sizes 64 256 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

import pipeline.writer.build as build
from pipeline.manifest import sha256_file
from pipeline.synthetic import make_dataset
from tools.shard_imagenet import main as shard_main

ROUNDS = 3


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
    print(f"| {images} images (--resize paper), best of {ROUNDS} interleaved | wall s | images/s |\n|---|---|---|")
    best = {name: float("inf") for name, _ in rows}
    for _ in range(ROUNDS):  # interleaved, so that a change in the machine's load falls on every row alike
        for name, runs in rows:
            for argv in runs:
                shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
            best[name] = min(best[name], timed(*runs))
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} | {images / seconds:.0f} |")
    fixed = min(timed(rows[0][1][0]) for _ in range(ROUNDS))
    print(f"| each process's fixed cost: a rerun of the finished folder (start, scan, plan) | {fixed:.1f} | |")


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


@contextlib.contextmanager
def s3_server():
    """moto_server (a real S3 API, from requirements-dev.txt) on 127.0.0.1, the AWS variables pointing at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield boto3.client("s3")
    finally:
        proc.kill()
        proc.wait()


def merge_cost(tmp: Path, sizes: list[int], per_class: int) -> None:
    """The last rank's merge (the other rank's records read, its files checked by size and mtime in a folder, by a
    HEAD in a bucket) as the shards grow in bytes at a fixed shard count; beside it, reading every shard once to hash
    it."""
    sources = {
        side: make_dataset(tmp / f"src{side}", 4, per_class, 0, size_range=(side, side), seed=side) for side in sizes
    }
    print("| --out | image side | MB sharded | shards | merge s | reading and hashing every shard once, s |")
    print("|---|---|---|---|---|---|")
    with s3_server() as client:
        for where in ("folder", "bucket"):
            for side, src in sources.items():
                if where == "bucket":
                    client.create_bucket(Bucket=f"bench-{side}")
                    out = f"s3://bench-{side}/shards"
                else:
                    out = str(tmp / f"out{side}")
                argv = ["--src", str(src), "--out", out, "--splits", "train", "--resize", "none"]
                argv += ["--shard-size", str(per_class // 4), "--workers", "2", "--world-size", "2"]
                timed([*argv, "--rank", "0"])
                spent = timed_merge([*argv, "--rank", "1"])
                mb, count, hashing = rehash(client, out)
                print(f"| {where} | {side} | {mb:.1f} | {count} | {spent:.3f} | {hashing:.3f} |")


def rehash(client, out: str) -> tuple[float, int, float]:
    """MB and number of the shards in `out`, and the seconds it takes to read and hash each once."""
    start, total, count = time.perf_counter(), 0, 0
    if out.startswith("s3://"):
        name, prefix = out[len("s3://") :].split("/", 1)
        for o in client.list_objects_v2(Bucket=name, Prefix=prefix + "/")["Contents"]:
            if o["Key"].endswith(".tar"):
                h = hashlib.sha256()
                for chunk in client.get_object(Bucket=name, Key=o["Key"])["Body"].iter_chunks(1 << 22):
                    h.update(chunk)
                total, count = total + o["Size"], count + 1
    else:
        for t in sorted(Path(out).glob("*.tar")):
            sha256_file(t)
            total, count = total + t.stat().st_size, count + 1
    return total / 1e6, count, time.perf_counter() - start


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
