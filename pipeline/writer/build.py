"""Sharding a source folder: hold its lock, plan the shuffled shards, hand each shard to a worker process, write the
manifest from their records, and resume a stopped run from its finished shards."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.atomic import atomic_write
from pipeline.lock import LOCK, Busy, hold
from pipeline.manifest import FORMAT_VERSION, MANIFEST, sealed, sha256_file
from pipeline.settings import SEED, at_least, between, option
from pipeline.writer import stats
from pipeline.writer.images import Resize, parse_resize
from pipeline.writer.layout import empty_classes, scan
from pipeline.writer.plan import fingerprint, plan, shown
from pipeline.writer.task import ShardTask, write_task
from pipeline.writer.workers import completed

PROGRESS = ".progress"  # per-shard records of a run in progress, so a rerun after a crash skips finished shards
TOOL = "tools/shard_imagenet.py"


class UsageError(Exception):
    """Bad arguments or an environment the run cannot work in (unwritable --out, full disk): one line, exit 2."""


def splits_named(splits: tuple[str, ...]) -> bool:
    return bool(splits) and all(re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in splits)


def resize_named(text: str) -> bool:
    try:
        return parse_resize(text) is not None
    except ValueError:
        return False


@dataclass
class ShardConfig:
    """The source, the shards and how they are written"""

    src: Path | None = option(None, "ImageNet root: train/<wnid>/*, val/ (class folders or flat)")
    out: Path | None = option(None, "shard folder to create (outside --src)")
    splits: tuple[str, ...] = option(
        ("train", "val"),
        "the folders of --src to shard",
        check=(
            splits_named,
            "one or more folder names of letters, digits, '-' and '_' (they name shards and keys)",
        ),
    )
    resize: str = option(
        "paper",
        "paper (§2: shorter side 256, central 256x256 crop) | short:N (keeps the aspect "
        "ratio) | none (the original JPEG where DALI reads it as it is)",
        check=(resize_named, ("paper, short:N with N at least 1, or none")),
    )
    quality: int = option(95, "JPEG quality of re-encoded images", check=between(1, 100))
    shard_size: int = option(
        5000, "samples per shard: ~150 MB at 256x256, ~500 MB with --resize none", check=at_least(1)
    )
    workers: int = option(os.cpu_count() or 1, "worker processes, each writing whole shards", check=at_least(1))
    seed: int = option(0, "the shuffle across shards and the statistics' pixel sample", check=SEED, shared=False)
    strict: bool = option(False, "exit 1 if any image was rejected or a class folder has none")
    verify: Path | None = option(None, "re-check this shard folder and exit")

    def output_args(self) -> dict:
        """The arguments that determine the output bytes (recorded in the manifest, compared on reruns)."""
        return {
            "splits": list(self.splits),
            "resize": self.resize,
            "quality": self.quality,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }


def run_record(cfg: ShardConfig) -> dict:
    return {"source": str(cfg.src.resolve()), "args": cfg.output_args()}


def previous(cfg: ShardConfig) -> tuple[dict | None, bool]:
    """What --out holds of these arguments: (manifest, True) when finished, (progress record, False) when a run was
    interrupted, (None, False) when empty; refuses someone else's folder or other arguments."""
    out = cfg.out
    if not any(f.name != LOCK for f in out.iterdir()):
        return None, False
    for path, done in ((out / MANIFEST, True), (out / PROGRESS / "args.json", False)):
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except ValueError:
                raise UsageError(f"{path}: unreadable; delete {out} and re-shard") from None
            if done and record.get("format_version") != FORMAT_VERSION:
                raise UsageError(
                    f"--out {out} holds shards of format {record.get('format_version')}, this sharder "
                    f"writes {FORMAT_VERSION}; pick a new --out or delete it"
                )
            theirs = {"source": record.get("source"), **(record.get("args") or {})}
            ours = run_record(cfg)
            ours = {"source": ours["source"], **ours["args"]}
            differ = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in ours.items() if theirs.get(k) != v]
            if differ:
                raise UsageError(
                    f"--out {out} holds shards made with different arguments: {', '.join(differ)}; "
                    f"pick a new --out or delete it"
                )
            return record, done
    raise UsageError(f"--out {out} is not empty and not a shard folder; pick an empty or new folder")


def check_writable(out: Path) -> None:
    """Fail before the (long) scan of --src if --out cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror}; pick a folder you can write to") from None


def output_error(e: OSError, out: Path) -> UsageError:
    """A failed read or write in --out as one line: the file, the cause and the fix; nothing half-written is kept."""
    why = "disk full, free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{e.strerror}, fix that"
    return UsageError(f"{e.filename or out}: {why}; then rerun the same command to resume")


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


def shard(cfg: ShardConfig) -> int:
    """Shard cfg.src into cfg.out, holding the folder's lock from before its first read to after the last write."""
    resize: Resize = parse_resize(cfg.resize)
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pick a folder")
    check_writable(out)
    try:
        with hold(out):
            try:
                return resume(cfg, resize)
            except BaseException:  # the other workers were killed mid-shard: their partial files are of no use
                for partial in out.glob(".*.tmp"):
                    partial.unlink(missing_ok=True)
                raise
    except Busy as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise output_error(e, out) from None


def resume(cfg: ShardConfig, resize: Resize) -> int:
    """Finish what --out holds of this run: nothing, an interrupted run's shards, or everything."""
    out = cfg.out
    record, complete = previous(cfg)
    src = scan(cfg.src.resolve(), list(cfg.splits))
    for w in src.warnings:
        print(f"warning: {w}", file=sys.stderr)
    current = fingerprint(src)
    for stale in out.glob(".*.tmp"):  # left by a crash inside atomic_write
        stale.unlink()
    if complete:
        return already_complete(cfg, record, current)
    if record is not None and record.get("fingerprint") != current:
        print(
            f"{out}: --src changed since the interrupted run (files added, removed or changed), or that run was "
            f"an older version of the sharder: planning again; the shards written so far are discarded"
        )
        discard(out, cfg.splits)
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    atomic_write(out / PROGRESS / "args.json", json.dumps({**run_record(cfg), "fingerprint": current}).encode())
    return write_all(cfg, src, resize)


def already_complete(cfg: ShardConfig, manifest: dict, current: str) -> int:
    out = cfg.out
    if manifest.get("fingerprint") != current:
        raise UsageError(
            f"--out {out} holds shards of an earlier --src: files were added, removed or changed since; "
            f"shard into a new --out, or delete {out} and rerun"
        )
    shutil.rmtree(out / PROGRESS, ignore_errors=True)  # a crash between the manifest and this cleanup
    print(f"{out}: already complete for these arguments and this --src; check it with --verify {out}")
    return strict_status(cfg, manifest)


def discard(out: Path, splits) -> None:
    """Remove a plan that no longer matches the source: progress records and the shards they describe."""
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    names = re.compile(f"(?:{'|'.join(re.escape(s) for s in splits)})" + r"-\d{6}\.(?:tar|idx)")
    for f in out.iterdir():
        if names.fullmatch(f.name):
            f.unlink()


def write_all(cfg: ShardConfig, src, resize: Resize) -> int:
    """Plan every split's shards, write the unfinished ones in worker processes, then the manifest."""
    out = cfg.out
    stats_split = "train" if "train" in cfg.splits else cfg.splits[0]
    shards = [
        (split, stem, samples)
        for split in cfg.splits
        for stem, samples in plan(src.samples[split], split, cfg.shard_size, cfg.seed)
    ]
    records = {stem: finished(out, stem) for _, stem, _ in shards}
    todo = [
        ShardTask(out, stem, samples, resize, cfg.quality, cfg.seed if split == stats_split else None)
        for split, stem, samples in shards
        if records[stem] is None
    ]
    if len(todo) < len(shards):
        print(f"resuming: {len(shards) - len(todo)} of {len(shards)} shards already complete")
    start, images = time.time(), sum(len(t.samples) for t in todo)
    with tqdm(total=images, unit="img", desc="sharding", dynamic_ncols=True) as bar:
        for i, record in completed(write_task, todo, cfg.workers):
            save_progress(out, todo[i].stem, record)
            records[todo[i].stem] = record
            bar.update(len(todo[i].samples))
    elapsed = time.time() - start

    manifest = sealed(build_manifest(cfg, src, resize, shards, records, stats_split))
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(out / PROGRESS)
    summarize(
        manifest,
        images,
        elapsed,
        sum(records[t.stem]["bytes_written"] for t in todo),
        max((records[t.stem].get("peak_rss", 0) for t in todo), default=0),
    )
    return strict_status(cfg, manifest)


def strict_status(cfg: ShardConfig, manifest: dict) -> int:
    """--strict: exit 1 whenever the shards were made with rejected images or a class without images, on the first run
    and on every rerun. Skipped files (not images) never fail it."""
    empty = manifest.get("empty_classes", [])
    if cfg.strict and (manifest["rejected"] or empty):
        print(
            f"--strict: {len(manifest['rejected'])} files rejected, {len(empty)} class folders without a usable "
            f"image (listed in {cfg.out / MANIFEST}); repair or remove them in --src, then delete {cfg.out} and "
            f"rerun",
            file=sys.stderr,
        )
        return 1
    return 0


def save_progress(out: Path, stem: str, record: dict) -> None:
    """A finished shard's record, so that a rerun after any stop skips it (if its files still match)."""
    atomic_write(out / PROGRESS / f"{stem}.json", json.dumps(record).encode())


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
    rejected = sorted(rejected, key=lambda r: r["file"])
    return {
        "format_version": FORMAT_VERSION,
        "tool": TOOL,
        **run_record(cfg),
        "fingerprint": fingerprint(src),
        "layout": src.layout,
        "preprocessing": {
            "resize": cfg.resize,
            "size": resize.size,
            "quality": cfg.quality,
            "resample": "bicubic",
            "chroma_subsampling": "4:2:0",
            "stats_split": stats_split,
        },
        "classes": src.classes,
        "splits": splits,
        "stats": stats.finish(moments),
        "repaired": sorted(repaired, key=lambda r: r["file"]),
        "rejected": rejected,
        "skipped": sorted(src.skipped, key=lambda r: r["file"]),
        "empty_classes": empty_classes(src, {r["file"] for r in rejected}),
    }


def summarize(manifest: dict, processed: int, elapsed: float, nbytes: int, peak_rss: int) -> None:
    for kind in ("repaired", "rejected"):
        for r in manifest[kind]:
            print(f"{kind}: {shown(r['file'])}: {r['reason']}")
    if manifest["skipped"]:
        kinds = Counter(
            os.path.splitext(r["file"])[1].lower() or os.path.basename(r["file"])
            if r["reason"] != "hidden file"
            else "hidden"
            for r in manifest["skipped"]
        )
        print(
            f"skipped, not images: {len(manifest['skipped'])} "
            f"({', '.join(f'{n} {shown(k)}' for k, n in sorted(kinds.items(), key=lambda kn: (-kn[1], kn[0])))}), "
            f"listed in manifest.json"
        )
    for folder in manifest["empty_classes"]:
        print(
            f"warning: class folder {shown(folder)} has no usable image: its class keeps its index with 0 samples; "
            f"add images or remove the folder",
            file=sys.stderr,
        )
    counts = ", ".join(f"{s} {v['count']} in {len(v['shards'])} shards" for s, v in manifest["splits"].items())
    written = sum(v["count"] for v in manifest["splits"].values())
    print(
        f"done: {written} images written ({counts}); {len(manifest['repaired'])} repaired, "
        f"{len(manifest['rejected'])} rejected; this run {processed} images, {nbytes / 1e6:.1f} MB, "
        f"{processed / max(elapsed, 1e-9):.0f} images/s; peak memory per worker {peak_rss / 2**20:.0f} MiB"
    )
