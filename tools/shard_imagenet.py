"""ImageNet (or any folder of class folders) -> shuffled WebDataset shards + DALI indexes + manifest.json.

python tools/shard_imagenet.py --src /data/imagenet --out /data/shards [--resize paper|short:N|none] [--strict]
python tools/shard_imagenet.py --verify /data/shards
"""

from __future__ import annotations

import signal
import sys

from pipeline.settings import parse, show
from pipeline.writer.build import ShardConfig, UsageError, shard
from pipeline.writer.layout import LayoutError
from pipeline.writer.verify import verify
from pipeline.writer.workers import WorkerDied


class Terminated(BaseException):
    """SIGTERM (a plain kill, a job scheduler's stop): a BaseException like KeyboardInterrupt, so no handler of
    ordinary errors takes it for a failed image."""


def terminate(signum, frame):
    raise Terminated


def parse_config(argv) -> ShardConfig:
    cfg, parser = parse(ShardConfig, argv, prog="tools/shard_imagenet.py", description=__doc__)
    if cfg.verify:
        if cfg.src or cfg.out:
            parser.error("--verify checks a shard folder alone: leave out --src and --out (or --verify)")
        return cfg
    if cfg.src is None or cfg.out is None:
        parser.error("--src and --out are both required (or --verify DIR)")
    if not cfg.src.is_dir():
        parser.error(f"--src {cfg.src}: no such folder")
    src, out = cfg.src.resolve(), cfg.out.resolve()
    if out == src or src in out.parents:
        parser.error(f"--out {cfg.out} is inside --src {cfg.src}; pick a folder outside the source")
    return cfg


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
