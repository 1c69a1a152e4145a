"""Sharding a source folder: hold --out's lock (a rank's own, with ranks), plan the shuffled shards, hand each of this
rank's shards to a worker process, and resume a stopped run from its finished shards; the last rank to finish merges
every shard's record into the manifest."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.lock import LOCK, Busy
from pipeline.manifest import FORMAT_VERSION, MANIFEST, sealed
from pipeline.settings import SEED, at_least, between, option
from pipeline.store import StoreError
from pipeline.writer.images import Resize, parse_resize
from pipeline.writer.layout import scan
from pipeline.writer.output import ARGS, MERGE, PROGRESS, Folder, Remote, UsageError, lock_name, open_output, rank_locks
from pipeline.writer.plan import fingerprint, plan
from pipeline.writer.summary import build_manifest, run_record, summarize
from pipeline.writer.task import ShardTask, write_task
from pipeline.writer.workers import completed

MERGE_PATIENCE = 300  # seconds a rank waits for another's merge (a few seconds' work) before it gives up


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
    out: str | None = option(None, "shard folder to create (outside --src), or s3://BUCKET/PREFIX")
    splits: tuple[str, ...] = option(
        ("train", "val"),
        "the folders of --src to shard",
        check=(splits_named, "one or more folder names of letters, digits, '-' and '_' (they name shards and keys)"),
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
    verify: str | None = option(None, "re-check this shard folder (or s3://BUCKET/PREFIX) and exit")
    rank: int | None = option(
        None, "this machine's share of the shards (default: $RANK, else $SLURM_PROCID, else 0)", check=at_least(0)
    )
    world_size: int | None = option(
        None, "machines sharding into one --out (default: $WORLD_SIZE, else $SLURM_NTASKS, else 1)", check=at_least(1)
    )

    def output_args(self) -> dict:
        """The arguments that determine the output bytes (recorded in the manifest, compared on reruns)."""
        return {
            "splits": list(self.splits),
            "resize": self.resize,
            "quality": self.quality,
            "shard_size": self.shard_size,
            "seed": self.seed,
        }


Output = Folder | Remote


def previous(cfg: ShardConfig, out: Output) -> tuple[dict | None, bool]:
    """What --out holds of these arguments: (manifest, True) when finished, (progress record, False) when a run was
    interrupted or ranks are writing, (None, False) when empty; refuses someone else's folder or other arguments."""
    if not [n for n in out.entries() if not n.startswith(LOCK) and n != PROGRESS]:
        return None, False
    for name, done in ((MANIFEST, True), (ARGS, False)):
        raw = out.read(name)
        if raw is not None:
            try:
                record = json.loads(raw)
            except ValueError:
                raise UsageError(f"{out.url}/{name}: unreadable; delete {out.url} and re-shard") from None
            if done and record.get("format_version") != FORMAT_VERSION:
                raise UsageError(
                    f"--out {out.url} holds shards of format {record.get('format_version')}, this sharder "
                    f"writes {FORMAT_VERSION}; pick a new --out or delete it"
                )
            theirs = {"source": record.get("source"), **(record.get("args") or {})}
            ours = run_record(cfg)
            ours = {"source": ours["source"], **ours["args"]}
            differ = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in ours.items() if theirs.get(k) != v]
            if differ:
                raise UsageError(
                    f"--out {out.url} holds shards made with different arguments: {', '.join(differ)}; "
                    f"pick a new --out or delete it"
                )
            return record, done
    raise UsageError(f"--out {out.url} is not empty and not a shard folder; pick an empty or new folder")


def output_error(e: OSError, out: Output) -> UsageError:
    """A failed read or write in --out as one line: the file, the cause and the fix; nothing half-written is kept."""
    why = "disk full, free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{e.strerror}, fix that"
    return UsageError(f"{e.filename or out.url}: {why}; then rerun the same command to resume")


def finished(out: Output, stem: str) -> dict | None:
    """A shard's record from an earlier run or another rank, if its files are still there as they were written."""
    raw = out.read(f"{PROGRESS}/{stem}.json")
    if raw is None:
        return None
    rec = json.loads(raw)
    return rec if rec["shard"] is None or out.intact(rec) else None


def ranks(cfg: ShardConfig) -> tuple[int, int]:
    return cfg.rank or 0, cfg.world_size or 1


def shard(cfg: ShardConfig) -> int:
    """Shard cfg.src into cfg.out, holding this run's lock from before its first read to after the last write."""
    resize: Resize = parse_resize(cfg.resize)
    out = open_output(cfg.out, lock_name(*ranks(cfg)))
    out.check()
    try:
        with out.lock(out.own_lock):
            refuse_others(out, *ranks(cfg))
            return resume(cfg, out, resize)
    except (Busy, StoreError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise output_error(e, out) from None


def live_others(out: Output) -> list[str]:
    """The other runs or ranks writing --out now, described."""
    names = [n for n in out.entries() if n.startswith(LOCK) and n not in (out.own_lock, MERGE)]
    return [f"{n}: {h}" for n in names if (h := out.writer(n))]


def refuse_others(out: Output, rank: int, world: int) -> None:
    """Ranks write one --out together; a run without ranks writes it alone."""
    others = live_others(out)
    if world == 1 and others:
        raise Busy(f"--out {out.url} is being written by ranks ({others[0]}); wait for them to end, then rerun")
    if world > 1 and (holder := out.writer(LOCK)):
        raise Busy(f"--out {out.url} is being written by a run without ranks ({holder}); wait for it to end")
    # Ranks of two world sizes would share the shards out differently, and two of them could write one shard at once.
    if world > 1 and (other := next((o for o in others if not o.startswith(rank_locks(world))), None)):
        raise Busy(
            f"--out {out.url} is being written by ranks of another --world-size ({other}); give every rank the same"
        )


def resume(cfg: ShardConfig, out: Output, resize: Resize) -> int:
    """Finish what --out holds of this run: nothing, an interrupted run's shards, or everything."""
    record, complete = previous(cfg, out)
    src = scan(cfg.src.resolve(), list(cfg.splits))
    for w in src.warnings:
        print(f"warning: {w}", file=sys.stderr)
    current = fingerprint(src)
    if complete:
        return already_complete(cfg, out, record, current)
    rank, world = ranks(cfg)
    shards = [
        (split, stem, samples)
        for split in cfg.splits
        for stem, samples in plan(src.samples[split], split, cfg.shard_size, cfg.seed)
    ]
    mine = shards[rank::world]
    out.clear([stem for _, stem, _ in mine])
    ours = {**run_record(cfg), "fingerprint": current}
    theirs = None if out.create(ARGS, json.dumps(ours).encode()) else json.loads(out.read(ARGS) or b"{}")
    if theirs is not None and {k: theirs.get(k) for k in ("source", "args")} != run_record(cfg):
        previous(cfg, out)  # a rank with other arguments wrote the plan since this one looked: refused by name
    if theirs is not None and theirs.get("fingerprint") != current:
        if others := live_others(out):
            raise UsageError(
                f"--out {out.url} is being written with another plan ({others[0]}): --src changed since it started, "
                f"or its arguments differ; give every rank the same --src and arguments"
            )
        print(
            f"{out.url}: --src changed since the interrupted run (files added, removed or changed), or that run was "
            f"an older version of the sharder: planning again; the shards written so far are discarded"
        )
        discard(out, cfg.splits)
        out.write(ARGS, json.dumps(ours).encode())
    return write_all(cfg, out, src, resize, shards, mine)


def already_complete(cfg: ShardConfig, out: Output, manifest: dict, current: str) -> int:
    if manifest.get("fingerprint") != current:
        raise UsageError(
            f"--out {out.url} holds shards of an earlier --src: files were added, removed or changed since; "
            f"shard into a new --out, or delete {out.url} and rerun"
        )
    out.finish()  # a crash between the manifest and this cleanup
    print(f"{out.url}: already complete for these arguments and this --src; check it with --verify {out.url}")
    return strict_status(cfg, manifest)


def discard(out: Output, splits) -> None:
    """Remove a plan that no longer matches the source: progress records and the shards they describe."""
    out.finish()
    names = re.compile(f"(?:{'|'.join(re.escape(s) for s in splits)})" + r"-\d{6}\.(?:tar|idx)")
    out.delete(*(n for n in out.entries() if names.fullmatch(n)))


def write_all(cfg: ShardConfig, out: Output, src, resize: Resize, shards: list, mine: list) -> int:
    """Write this rank's unfinished shards in worker processes; then, if every shard is done, the manifest."""
    stats_split = "train" if "train" in cfg.splits else cfg.splits[0]
    records = {stem: finished(out, stem) for _, stem, _ in mine}
    todo = [
        ShardTask(
            out.staging, stem, samples, resize, cfg.quality, cfg.seed if split == stats_split else None, out.target
        )
        for split, stem, samples in mine
        if records[stem] is None
    ]
    if len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
    start, images = time.time(), sum(len(t.samples) for t in todo)
    try:
        with tqdm(total=images, unit="img", desc="sharding", dynamic_ncols=True) as bar:
            for i, record in completed(write_task, todo, cfg.workers):
                save_progress(out, todo[i].stem, record)
                records[todo[i].stem] = record
                bar.update(len(todo[i].samples))
    except BaseException:  # the other workers were stopped mid-shard: their partial files are of no use to a rerun
        if isinstance(out, Folder):
            out.clear([t.stem for t in todo])
        else:
            shutil.rmtree(out.staging, ignore_errors=True)
        raise
    elapsed = time.time() - start
    if isinstance(out, Remote):
        shutil.rmtree(out.staging, ignore_errors=True)
    ran = (
        images,
        elapsed,
        sum(records[t.stem]["bytes_written"] for t in todo),
        max((records[t.stem].get("peak_rss", 0) for t in todo), default=0),
    )
    manifest = merge(cfg, out, src, resize, shards, records, stats_split)
    if manifest is None:
        return 0
    summarize(manifest, *ran)
    return strict_status(cfg, manifest)


def save_progress(out: Output, stem: str, record: dict) -> None:
    """A finished shard's record, so that a rerun after any stop skips it (if its files still match)."""
    out.write(f"{PROGRESS}/{stem}.json", json.dumps(record).encode())


def merge(cfg: ShardConfig, out: Output, src, resize: Resize, shards, records: dict, stats_split: str) -> dict | None:
    """The manifest, written last from every shard's record (the other ranks' read, their files checked by size, not
    read again), once every shard is done; None while other ranks still have shards to write."""
    rank, world = ranks(cfg)
    deadline = time.monotonic() + MERGE_PATIENCE
    while True:
        try:
            with out.lock(MERGE):
                if (raw := out.read(MANIFEST)) is not None:  # another rank merged while this one waited
                    print(f"{out.url}: complete (rank {rank} of {world} wrote its share; another merged)")
                    return json.loads(raw)
                others = [stem for _, stem, _ in shards if stem not in records]
                with ThreadPoolExecutor(16) as pool:
                    records = {**records, **dict(zip(others, pool.map(lambda s: finished(out, s), others)))}
                left = [stem for stem, rec in records.items() if rec is None]
                if left:
                    print(
                        f"rank {rank} of {world}: its shards are done; {len(left)} shards of other ranks are not yet "
                        f"(the last rank to finish writes the manifest; rerun a stopped rank to continue it)"
                    )
                    return None
                manifest = sealed(build_manifest(cfg, src, resize, shards, records, stats_split))
                out.write(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
                out.finish()
                return manifest
        except Busy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def strict_status(cfg: ShardConfig, manifest: dict) -> int:
    """--strict: exit 1 whenever the shards were made with rejected images or a class without images, on the first run
    and on every rerun. Skipped files (not images) never fail it."""
    empty = manifest.get("empty_classes", [])
    if cfg.strict and (manifest["rejected"] or empty):
        print(
            f"--strict: {len(manifest['rejected'])} files rejected, {len(empty)} class folders without a usable "
            f"image (listed in {cfg.out}/{MANIFEST}); repair or remove them in --src, then delete {cfg.out} and "
            f"rerun",
            file=sys.stderr,
        )
        return 1
    return 0
