"""One shard as one worker's task: prepare its samples in plan order, stream the tar and the DALI index into --out (or
into staging, then upload and check them), and return only the shard's record (counts, checksums, how it is stored,
statistics sums, repairs, rejections)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.store import Location
from pipeline.writer import stats
from pipeline.writer.bucket import upload
from pipeline.writer.images import Resize, prepare
from pipeline.writer.layout import Entry
from pipeline.writer.output import stamps
from pipeline.writer.tars import Sample, write_shard


@dataclass(frozen=True)
class ShardTask:
    out: Path  # --out, or the staging folder of a bucket
    stem: str
    samples: list[tuple[str, Entry]]  # (key, source entry) in the plan's order
    resize: Resize
    quality: int
    stats_seed: int | None  # the seed of the pixel sample, for the split the statistics come from
    target: Location | None = None  # where the staged shard goes


@dataclass
class Tally:
    """What a shard's record says beside the tar: repairs, rejections, pixel sums and the smallest side written."""

    repaired: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    moments: dict = field(default_factory=lambda: stats.ZERO)
    sides: list = field(default_factory=list)
    peak_rss: int = 0


def prepared(task: ShardTask, tally: Tally):
    """The shard's samples as written, its repairs and rejections counted into `tally` on the way."""
    for key, e in task.samples:
        r = prepare(e.path, key, task.resize, task.quality, task.stats_seed)
        tally.peak_rss = max(tally.peak_rss, r.peak_rss)
        if r.rejected:
            tally.rejected.append({"file": e.rel, "reason": r.rejected})
            continue
        if r.repaired:
            tally.repaired.append({"file": e.rel, "reason": r.repaired})
        if r.moments:
            tally.moments = stats.add(tally.moments, r.moments)
        tally.sides.append(min(r.size))
        yield Sample(key, r.jpeg, e.label, e.rel)


def write_task(task: ShardTask) -> dict:
    """Write one shard (no files when every image was rejected); its record for the progress file and the manifest."""
    tally = Tally()
    shard = write_shard(task.out, task.stem, prepared(task, tally))
    record = asdict(shard) if shard else None
    stored = None
    if record is not None:
        stored = publish(task.target, task.out, record) if task.target else stamps(task.out, record)
    return {
        "shard": record,
        "stored": stored,
        "repaired": tally.repaired,
        "rejected": tally.rejected,
        "moments": tally.moments,
        "min_side": min(tally.sides, default=None),
        "bytes_written": record["tar_bytes"] if record else 0,
        "peak_rss": tally.peak_rss,
    }


def publish(target: Location, staging: Path, shard: dict) -> dict:
    """Upload a staged shard, tar before index as on disk, each checked against its sha256, then free the staging
    disk; the objects' sizes."""
    sizes = {}
    for name, digest in ((shard["tar"], shard["tar_sha256"]), (shard["index"], shard["index_sha256"])):
        sizes[name] = [(staging / name).stat().st_size]
        upload(target, staging / name, digest)
        (staging / name).unlink()
    return sizes
