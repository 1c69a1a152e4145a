"""ImageNet (or any folder of class folders) -> shuffled WebDataset shards + DALI indexes + manifest.json.

    python tools/shard_imagenet.py --src /data/imagenet --out /data/shards [--resize paper|short:N|none]
    python tools/shard_imagenet.py --verify /data/shards
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.writer.build import ShardConfig, UsageError, shard  # noqa: E402
from pipeline.writer.images import parse_resize  # noqa: E402
from pipeline.writer.layout import LayoutError  # noqa: E402
from pipeline.writer.verify import verify  # noqa: E402
from pipeline.writer.workers import WorkerDied  # noqa: E402


class Terminated(BaseException):
    """SIGTERM (a plain kill, a job scheduler's stop): a BaseException like KeyboardInterrupt, so no handler of
    ordinary errors takes it for a failed image."""


def terminate(signum, frame):
    raise Terminated


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
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in cfg.splits):  # they name shard files and sample keys
        raise UsageError(f"--splits {a.splits}: use letters, digits, '-' and '_' only (folder names such as train,val)")
    src, out = cfg.src.resolve(), cfg.out.resolve()
    if out == src or src in out.parents:
        raise UsageError(f"--out {cfg.out} is inside --src {cfg.src}; pick a folder outside the source")
    return cfg


def main(argv=None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # paths that are not UTF-8 print escaped, as on stderr, instead of raising
        sys.stdout.reconfigure(errors="backslashreplace")
    on_term = signal.signal(signal.SIGTERM, terminate)
    try:
        cfg = parse_config(argv)
        print(cfg.show())
        return verify(cfg.verify, cfg.workers) if cfg.verify else shard(cfg)
    except (UsageError, LayoutError) as e:
        print(f"shard_imagenet: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"shard_imagenet: {e}; rerun the same command (finished shards are kept)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    sys.exit(main())
