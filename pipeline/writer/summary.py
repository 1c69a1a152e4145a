"""What a run wrote, merged from its shards' records: the manifest's content and the summary printed at the end."""

from __future__ import annotations

import os
import sys
from collections import Counter

from pipeline.manifest import FORMAT_VERSION
from pipeline.writer import stats
from pipeline.writer.images import Resize
from pipeline.writer.layout import empty_classes
from pipeline.writer.plan import fingerprint, shown

TOOL = "tools/shard_imagenet.py"


def run_record(cfg) -> dict:
    return {"source": str(cfg.src.resolve()), "args": cfg.output_args()}


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
