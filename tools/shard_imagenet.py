"""ImageNet (or any folder of class folders) -> shuffled WebDataset shards + DALI indexes + manifest.json.

    python tools/shard_imagenet.py --src /data/imagenet --out /data/shards [--resize paper|short:N|none]
    python tools/shard_imagenet.py --verify /data/shards
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.manifest import FORMAT_VERSION, MANIFEST, sha256_file  # noqa: E402
from tools import rgb_stats  # noqa: E402
from tools.image_prep import Resize, parse_resize, prepare  # noqa: E402
from tools.imagenet_layout import Entry, LayoutError, scan  # noqa: E402
from tools.shard_verify import verify  # noqa: E402
from tools.atomic import atomic_write  # noqa: E402
from tools.shard_writer import Sample, write_shard  # noqa: E402

PROGRESS = ".progress"  # per-shard records of a run in progress, so a rerun after a crash skips finished shards
TOOL = "tools/shard_imagenet.py"


class UsageError(Exception):
    """Bad arguments: one line, exit 2."""


@dataclass
class ShardConfig:
    src: Path | None = None
    out: Path | None = None
    splits: tuple[str, ...] = ("train", "val")
    resize: str = "paper"  # §2: shorter side to 256, central 256x256 crop
    quality: int = 95  # JPEG quality of re-encoded images
    shard_size: int = 5000  # samples per shard: ~150 MB at 256x256, ~500 MB with --resize none
    workers: int = os.cpu_count() or 1
    seed: int = 0
    strict: bool = False
    verify: Path | None = None

    def output_args(self) -> dict:
        """The arguments that determine the output bytes (recorded in the manifest, compared on reruns)."""
        return {"splits": list(self.splits), "resize": self.resize, "quality": self.quality,
                "shard_size": self.shard_size, "seed": self.seed}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_config(argv) -> ShardConfig:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ShardConfig()
    p.add_argument("--src", type=Path, help="ImageNet root: train/<wnid>/*, val/ (class folders or flat)")
    p.add_argument("--out", type=Path, help="shard folder to create (outside --src)")
    p.add_argument("--splits", default=",".join(d.splits))
    p.add_argument("--resize", default=d.resize, help="paper | short:N | none")
    p.add_argument("--quality", type=int, default=d.quality)
    p.add_argument("--shard-size", type=int, default=d.shard_size)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--strict", action="store_true", help="exit 1 if any file was rejected")
    p.add_argument("--verify", type=Path, metavar="DIR", help="re-check a shard folder and exit")
    a = p.parse_args(argv)
    cfg = ShardConfig(a.src, a.out, tuple(s for s in a.splits.split(",") if s), a.resize, a.quality, a.shard_size,
                      a.workers, a.seed, a.strict, a.verify)
    if cfg.verify:
        return cfg
    if cfg.src is None or cfg.out is None:
        raise UsageError("--src and --out are both required (or --verify DIR)")
    if not cfg.src.is_dir():
        raise UsageError(f"--src {cfg.src}: no such folder")
    try:
        parse_resize(cfg.resize)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 1 <= cfg.quality <= 100 or cfg.shard_size < 1 or cfg.workers < 1 or not cfg.splits:
        raise UsageError("--quality must be 1-100, --shard-size and --workers >= 1, --splits not empty")
    src, out = cfg.src.resolve(), cfg.out.resolve()
    if out == src or src in out.parents:
        raise UsageError(f"--out {cfg.out} is inside --src {cfg.src}; pick a folder outside the source")
    return cfg


def run_record(cfg: ShardConfig) -> dict:
    return {"source": str(cfg.src.resolve()), "args": cfg.output_args()}


def check_out(cfg: ShardConfig) -> bool:
    """True when --out already holds the finished result of these arguments; refuses someone else's folder."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pick a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    for record, done in ((out / MANIFEST, True), (out / PROGRESS / "args.json", False)):
        if record.is_file():
            try:
                theirs = json.loads(record.read_text())
            except ValueError:
                raise UsageError(f"{record}: unreadable; delete {out} and re-shard") from None
            ours = run_record(cfg)
            theirs = {"source": theirs.get("source"), **(theirs.get("args") or {})}
            ours = {"source": ours["source"], **ours["args"]}
            differ = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in ours.items() if theirs.get(k) != v]
            if differ:
                raise UsageError(f"--out {out} holds shards made with different arguments: {', '.join(differ)}; "
                                 f"pick a new --out or delete it")
            return done
    raise UsageError(f"--out {out} is not empty and not a shard folder; pick an empty or new folder")


def plan(entries: list[Entry], split: str, cfg: ShardConfig) -> list[tuple[str, list[Entry]]]:
    """Shuffle a split with the seed (DALI only shuffles within a buffer) and cut it into shards."""
    entries = sorted(entries, key=lambda e: e.key)
    order = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())]).permutation(len(entries))
    shuffled = [entries[i] for i in order]
    return [(f"{split}-{i // cfg.shard_size:06d}", shuffled[i:i + cfg.shard_size])
            for i in range(0, len(shuffled), cfg.shard_size)]


def finished(out: Path, stem: str) -> dict | None:
    """A shard's record from an earlier run, if its tar and index are there with the recorded checksums."""
    path = out / PROGRESS / f"{stem}.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    shard = rec["shard"]
    if shard is None:
        return rec
    for name, digest in ((shard["tar"], shard["tar_sha256"]), (shard["index"], shard["index_sha256"])):
        if not (out / name).is_file() or sha256_file(out / name) != digest:
            return None
    return rec


def _prepare(task):
    return prepare(*task)


def shard(cfg: ShardConfig) -> int:
    resize: Resize = parse_resize(cfg.resize)
    out = cfg.out
    complete = check_out(cfg)
    for stale in out.glob(".*.tmp"):  # left by a crash inside atomic_write
        stale.unlink()
    if complete:
        shutil.rmtree(out / PROGRESS, ignore_errors=True)  # a crash between the manifest and this cleanup
        print(f"{out}: already complete for these arguments; check it with --verify {out}")
        return 0
    src = scan(cfg.src.resolve(), list(cfg.splits))
    stats_split = "train" if "train" in cfg.splits else cfg.splits[0]
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    atomic_write(out / PROGRESS / "args.json", json.dumps(run_record(cfg)).encode())

    shards = [(split, stem, entries) for split in cfg.splits for stem, entries in plan(src.samples[split], split, cfg)]
    records = {stem: finished(out, stem) for _, stem, _ in shards}
    todo = [(split, stem, entries) for split, stem, entries in shards if records[stem] is None]
    tasks = [(e.path, e.key, resize, cfg.quality, cfg.seed if split == stats_split else None)
             for split, _, entries in todo for e in entries]
    skipped = len(shards) - len(todo)
    if skipped:
        print(f"resuming: {skipped} of {len(shards)} shards already complete")
    start = time.time()
    bar = tqdm(total=len(tasks), unit="img", desc="sharding", dynamic_ncols=True)
    pool = Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        results = pool.imap(_prepare, tasks, chunksize=8) if pool else map(_prepare, tasks)
        for split, stem, entries in todo:
            records[stem] = write_one(out, src.root, stem, entries, results, bar)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    elapsed = time.time() - start

    manifest = build_manifest(cfg, src, resize, shards, records, stats_split)
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(out / PROGRESS)
    summarize(manifest, len(tasks), elapsed, sum(records[s]["bytes_written"] for _, s, _ in todo))
    if cfg.strict and manifest["rejected"]:
        print(f"--strict: {len(manifest['rejected'])} files rejected (listed above and in {out / MANIFEST})",
              file=sys.stderr)
        return 1
    return 0


def write_one(out: Path, root: Path, stem: str, entries: list[Entry], results, bar) -> dict:
    """Collect one shard's prepared images (in plan order), write tar + index, then its progress record."""
    samples, repaired, rejected, moments = [], [], [], rgb_stats.ZERO
    for e in entries:
        r = next(results)
        bar.update()
        file = os.path.relpath(e.path, root)
        if r.rejected:
            rejected.append({"file": file, "reason": r.rejected})
            continue
        if r.repaired:
            repaired.append({"file": file, "reason": r.repaired})
        if r.moments:
            moments = rgb_stats.add(moments, r.moments)
        samples.append(Sample(e.key, r.jpeg, e.label))
    record = asdict(write_shard(out, stem, samples)) if samples else None
    rec = {"shard": record, "repaired": repaired, "rejected": rejected, "moments": moments,
           "bytes_written": record["tar_bytes"] if record else 0}
    atomic_write(out / PROGRESS / f"{stem}.json", json.dumps(rec).encode())
    return rec


def build_manifest(cfg, src, resize: Resize, shards, records, stats_split: str) -> dict:
    splits, moments, repaired, rejected = {}, rgb_stats.ZERO, [], list(src.rejected)
    for split, stem, _ in shards:
        rec = records[stem]
        entry = splits.setdefault(split, {"count": 0, "shards": []})
        if rec["shard"]:
            entry["shards"].append(rec["shard"])
            entry["count"] += rec["shard"]["count"]
        if split == stats_split:
            moments = rgb_stats.add(moments, rec["moments"])
        repaired += rec["repaired"]
        rejected += rec["rejected"]
    for split in cfg.splits:
        splits.setdefault(split, {"count": 0, "shards": []})
    return {"format_version": FORMAT_VERSION, "tool": TOOL, **run_record(cfg), "layout": src.layout,
            "preprocessing": {"resize": cfg.resize, "size": resize.size, "quality": cfg.quality,
                              "resample": "bicubic", "chroma_subsampling": "4:2:0", "stats_split": stats_split},
            "classes": src.classes, "splits": splits, "stats": rgb_stats.finish(moments),
            "repaired": sorted(repaired, key=lambda r: r["file"]), "rejected": sorted(rejected, key=lambda r: r["file"])}


def summarize(manifest: dict, processed: int, elapsed: float, nbytes: int) -> None:
    for kind in ("repaired", "rejected"):
        for r in manifest[kind]:
            print(f"{kind}: {r['file']}: {r['reason']}")
    counts = ", ".join(f"{s} {v['count']} in {len(v['shards'])} shards" for s, v in manifest["splits"].items())
    written = sum(v["count"] for v in manifest["splits"].values())
    print(f"done: {written} images written ({counts}); {len(manifest['repaired'])} repaired, "
          f"{len(manifest['rejected'])} rejected; this run {processed} images, {nbytes / 1e6:.1f} MB, "
          f"{processed / max(elapsed, 1e-9):.0f} images/s")


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        print(cfg)
        return verify(cfg.verify, cfg.workers) if cfg.verify else shard(cfg)
    except (UsageError, LayoutError) as e:
        print(f"shard_imagenet: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
