"""Sharding a source folder: plan the shuffled shards, prepare images in worker processes, write tars, indexes and
the manifest, and resume a killed run from its finished shards."""
from __future__ import annotations

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

from pipeline.atomic import atomic_write
from pipeline.manifest import FORMAT_VERSION, MANIFEST, sha256_file
from pipeline.writer import stats
from pipeline.writer.images import Resize, parse_resize, prepare
from pipeline.writer.layout import Entry, scan
from pipeline.writer.tars import Sample, write_shard

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
    samples, repaired, rejected, moments, sides = [], [], [], stats.ZERO, []
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
            moments = stats.add(moments, r.moments)
        samples.append(Sample(e.key, r.jpeg, e.label))
        sides.append(min(r.size))
    record = asdict(write_shard(out, stem, samples)) if samples else None
    rec = {"shard": record, "repaired": repaired, "rejected": rejected, "moments": moments,
           "min_side": min(sides, default=None), "bytes_written": record["tar_bytes"] if record else 0}
    atomic_write(out / PROGRESS / f"{stem}.json", json.dumps(rec).encode())
    return rec


def build_manifest(cfg, src, resize: Resize, shards, records, stats_split: str) -> dict:
    splits, moments, repaired, rejected = {}, stats.ZERO, [], list(src.rejected)
    for split, stem, _ in shards:
        rec = records[stem]
        entry = splits.setdefault(split, {"count": 0, "shards": [], "min_side": None})
        if rec["shard"]:
            entry["shards"].append(rec["shard"])
            entry["count"] += rec["shard"]["count"]
            entry["min_side"] = min(rec["min_side"], entry["min_side"] or rec["min_side"])  # for run.py's crop check
        if split == stats_split:
            moments = stats.add(moments, rec["moments"])
        repaired += rec["repaired"]
        rejected += rec["rejected"]
    for split in cfg.splits:
        splits.setdefault(split, {"count": 0, "shards": [], "min_side": None})
    return {"format_version": FORMAT_VERSION, "tool": TOOL, **run_record(cfg), "layout": src.layout,
            "preprocessing": {"resize": cfg.resize, "size": resize.size, "quality": cfg.quality,
                              "resample": "bicubic", "chroma_subsampling": "4:2:0", "stats_split": stats_split},
            "classes": src.classes, "splits": splits, "stats": stats.finish(moments),
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
