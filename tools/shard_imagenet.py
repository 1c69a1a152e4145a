"""ImageNet (or any folder of class folders) -> shuffled WebDataset shards + DALI indexes + manifest.json.

python tools/shard_imagenet.py --src /data/imagenet --out /data/shards [--resize paper|short:N|none] [--strict]
python tools/shard_imagenet.py --src /data/imagenet --out s3://bucket/imagenet [--rank R --world-size N]
python tools/shard_imagenet.py --verify /data/shards
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

from model.train.config import SAVED_SETTINGS
from pipeline.settings import parse, show
from pipeline.store import StoreError
from pipeline.writer.bucket import parse_url
from pipeline.writer.build import ShardConfig, UsageError, shard
from pipeline.writer.layout import LayoutError
from pipeline.writer.verify import verify, verify_bucket
from pipeline.writer.workers import WorkerDied


class Terminated(BaseException):
    """SIGTERM (a plain kill, a job scheduler's stop): a BaseException like KeyboardInterrupt, so no handler of
    ordinary errors takes it for a failed image."""


def terminate(signum, frame):
    raise Terminated


# Where a launcher says which process this is: torchrun, then SLURM (srun -n N); a job array passes the flags.
RANK_VARS, WORLD_VARS = ("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS")


def from_env(names: tuple[str, ...], parser) -> int | None:
    for name in names:
        if (value := os.environ.get(name, "").strip()) != "":
            try:
                return int(value)
            except ValueError:
                parser.error(f"${name}={value!r} is not a whole number; unset it or pass the flag")
    return None


def ranked(cfg: ShardConfig, parser) -> ShardConfig:
    """--rank and --world-size, taken from the launcher's variables where not given."""
    rank = cfg.rank if cfg.rank is not None else from_env(RANK_VARS, parser)
    world = cfg.world_size if cfg.world_size is not None else from_env(WORLD_VARS, parser)
    rank, world = rank or 0, world or 1
    if not 0 <= rank < world:
        parser.error(f"rank {rank} is outside a world of {world} (0..{world - 1}); pass --rank R --world-size N")
    return dataclasses.replace(cfg, rank=rank, world_size=world)


def parse_config(argv) -> ShardConfig:
    cfg, parser = parse(ShardConfig, argv, prog="tools/shard_imagenet.py", description=__doc__, others=SAVED_SETTINGS)
    for name in ("out", "verify"):
        if getattr(cfg, name) == "":
            parser.error(f"--{name}: an empty path (for the current folder, pass .)")
        try:
            parse_url(getattr(cfg, name) or "")
        except StoreError as e:
            parser.error(f"--{name} {e}")
    if cfg.verify:
        if cfg.src or cfg.out:
            parser.error("--verify checks a shard folder alone: leave out --src and --out (or --verify)")
        return cfg
    if cfg.src is None or cfg.out is None:
        parser.error("--src and --out are both required (or --verify DIR)")
    if not cfg.src.is_dir():
        parser.error(f"--src {cfg.src}: no such folder")
    src, out = cfg.src.resolve(), Path(cfg.out).resolve()
    if not parse_url(cfg.out) and (out == src or src in out.parents):
        parser.error(f"--out {cfg.out} is inside --src {cfg.src}; pick a folder outside the source")
    return ranked(cfg, parser)


def main(argv=None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # paths that are not UTF-8 print escaped, as on stderr, instead of raising
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        cfg = parse_config(argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code
    on_term = signal.signal(signal.SIGTERM, terminate)
    try:
        if not cfg.verify:
            print(show(cfg))
        if cfg.verify:
            bucket = parse_url(cfg.verify)
            return verify_bucket(bucket, cfg.workers) if bucket else verify(Path(cfg.verify), cfg.workers)
        return shard(cfg)
    except (UsageError, LayoutError, StoreError) as e:
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
