"""Plot a run's metrics.jsonl: training loss, validation top-1/top-5 error and throughput per epoch, as one PNG.

    python tools/plot_metrics.py WORKDIR/metrics.jsonl [--out WORKDIR/metrics.png]

run.py writes both files after every epoch (model/train/metrics.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.train.metrics import plot, read_metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    ap.add_argument("--out", type=Path, help="PNG to write (default: metrics.png beside the input)")
    args = ap.parse_args(argv)
    try:
        rows = read_metrics(args.metrics)
        if not rows:
            raise ValueError("no epochs recorded yet")
        out = plot(rows, args.out or args.metrics.with_name("metrics.png"), title=str(args.metrics.parent))
    except (OSError, ValueError, KeyError) as e:
        print(f"{args.metrics}: cannot plot ({e!r}); point at a run's WORKDIR/metrics.jsonl", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
