"""Will the GPU wait on data? The DALI loader, the training step, both together, and plain PyTorch, in one run.

    python tools/bench_io.py --shards DIR [--batch-size 256 --compile] [--sweep] [--json FILE] [--plot FILE]
                             [--trace FILE]
    python tools/bench_io.py --config runs/alexnet/config.json --shards DIR     the loader setting of a training run

Modes, all on the same shards, in this order: `loader` (DaliLoader alone, then on across its next epoch boundary: up
to an epoch, ~1 minute of ImageNet on an H100), `model` (run.py's training step on synthetic batches already on the
device: the compute ceiling), `e2e` (that step fed by that loader), then the like-for-like baseline (torch DataLoader
+ webdataset + Pillow workers doing the same augmentation on the same shards, pipeline/baseline.py, as many workers as
DALI has threads): `baseline` alone and `baseline_e2e` feeding the same step.
Each figure is the median images/s of --windows back-to-back windows of --steps steps, after --warmup steps; on a GPU
the windows are CUDA events on the training stream, so DALI's prefetch keeps running across them. Figures from
windows too short to mean much are marked `indicative`.
Each figure is printed, and written to --json (rewritten atomically), as soon as it is measured: a run cut off keeps
every figure before the cut, and the table at the end (also on SIGTERM) shows what is there. The JSON holds `machine`,
`config`, `data`, `setting` (the DALI setting timed, after --sweep the best one), one object per mode, `memory` (the
training part's peak, before the baseline runs) and the derived `overlap`, `speedup_vs_baseline` (end to end against
the baseline's end to end), `loader_vs_baseline` (and per core), `sweep`, `towers` (with --tower-convs dense grouped
split the model alone is also timed with each other way of running the towers; the first one named is the one every
mode uses).
"""

from __future__ import annotations

import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from model import AlexNet
from model.alexnet import TOWER_CONVS
from model.train.config import SAVED_SETTINGS, alexnet_refuses
from model.train.recipe import AMP_DTYPES, ComputeSettings, make_train_step, sgd
from pipeline.bench.modes import TRACE_STEPS, Bench, check_sizes, run
from pipeline.bench.report import Record, table, write_plot
from pipeline.bench.sweep import KINDS, parse_values
from pipeline.bench.timing import describe_machine
from pipeline.cache import CacheSettings, local_shards
from pipeline.graphs import MMAP
from pipeline.manifest import ShardError, load_manifest
from pipeline.settings import LoaderSettings, at_least, option, parse, refused, show, to_json
from pipeline.store import is_url
from pipeline.threads import default_threads

# --quick: about a minute on a 2-core CPU, where one training step of the 60M-parameter model takes seconds
QUICK = {"steps": 2, "windows": 3, "warmup": 1}
QUICK_CPU = {"batch_size": 32, "crop_size": 64}
TARGET = "a file path (not a folder) in a folder that exists"


def target(path) -> bool:
    return bool(path) and not Path(path).is_dir() and Path(path).resolve().parent.is_dir()


@dataclass(kw_only=True)
class BenchConfig(LoaderSettings, ComputeSettings, CacheSettings):
    """What is timed, and how"""

    shards: str = option(help="shard folder written by tools/shard_imagenet.py, or its s3:// or gs:// URL")
    workers: int | None = option(
        None, "baseline DataLoader processes; default: as many as DALI's threads (equal cores)", check=at_least(1)
    )
    steps: int = option(20, "steps per timed window", check=at_least(1))
    windows: int = option(5, "timed windows per figure; the median is reported", check=at_least(1))
    warmup: int = option(
        10, "untimed steps first (cudnn autotuning, compilation, worker start-up, DALI prefetch)", check=at_least(0)
    )
    tower_convs: tuple[str, ...] = option(
        ("dense",),
        "the model alone timed with each way of running the towers "
        "(model.alexnet.TowerConv); the first is the one every mode uses",
        choices=TOWER_CONVS,
    )
    sweep: bool = option(
        False, "tune batch size, threads, hw_decoder_load and prefetch (and on a GPU the stream) first"
    )
    sweep_values: tuple[str, ...] = option(
        (),
        f"KNOB=V,V ...: sweep only these values (KNOB one of "
        f"{', '.join(KINDS)}; implies --sweep), e.g. hw_decoder_load=1,0.65,0",
    )
    baseline: bool = option(True, "time the DataLoader + Pillow baseline too, alone and end to end")
    quick: bool = option(False, "short windows: 2 steps, 3 windows, 1 warm-up step; on the CPU also batch 32, crop 64")
    json: str | None = option(
        None, "write every figure and the machine here, each figure as it is measured", check=(target, TARGET)
    )
    plot: str | None = option(None, "write a PNG bar chart here", check=(target, TARGET))
    trace: str | None = option(
        None,
        f"write a torch.profiler trace (Chrome/Perfetto JSON; .json.gz compressed) of {TRACE_STEPS} end-to-end steps "
        "here, with ranges for the data wait, DALI's run and the training step",
        check=(target, TARGET),
    )


def quick_preset(given: dict) -> dict:
    device = ComputeSettings(device=given.get("device", "auto")).resolve_device()["device"]
    return {**QUICK, **(QUICK_CPU if device == "cpu" else {})} if given.get("quick") else {}


def parse_args(argv: list[str] | None) -> BenchConfig:
    """Declared defaults, then the --quick preset, then --config, then whatever was given on the command line; each
    --sweep-values value held to its setting's declared check, and every output path tried, before anything runs."""
    cfg, p = parse(
        BenchConfig,
        argv,
        prog="tools/bench_io.py",
        description=__doc__,
        preset=quick_preset,
        others=SAVED_SETTINGS,
        check=alexnet_refuses,
    )
    loader = LoaderSettings.of(cfg)
    try:
        grid = dict(map(parse_values, cfg.sweep_values))
    except ValueError as e:
        p.error(f"--sweep-values {e}")
    for name, values in grid.items():
        for v in values:
            if hasattr(loader, name) and (bad := refused(replace(loader, **{name: v}))):
                p.error(f"--sweep-values {name}={v}: {bad[2]}")
    threads = cfg.threads or default_threads()
    cfg = replace(
        cfg, **cfg.resolve_device(), threads=threads, workers=cfg.workers or threads, sweep=cfg.sweep or bool(grid)
    )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; leave --device out to use the CPU")
    if cfg.device == "cpu" and set(grid.get("stream", ())) - {"default"}:
        p.error("--sweep-values stream: a dedicated CUDA stream needs a GPU; leave stream out on the CPU")
    for name in ("json", "plot", "trace"):
        path = getattr(cfg, name)
        try:
            if path:
                tempfile.NamedTemporaryFile(dir=Path(path).resolve().parent).close()
        except OSError as e:
            p.error(f"--{name} {path}: cannot write in its folder ({e.strerror}); pick another path")
    return cfg


def make_step(cfg: BenchConfig, num_classes: int, tower_convs: str):
    """run.py's training step on a freshly seeded AlexNet whose towers run as `tower_convs`."""
    torch.manual_seed(cfg.seed)
    model = AlexNet(num_classes=num_classes, tower_convs=tower_convs)
    model = model.to(cfg.device, memory_format=torch.channels_last)
    return make_train_step(model, sgd(model), cfg.amp, False if cfg.compile == "off" else cfg.compile)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    grid = dict(map(parse_values, cfg.sweep_values))  # checked by parse_args
    print(show(cfg), flush=True)
    try:
        manifest = load_manifest(local_shards(cfg.shards, cfg.cache_dir))
        manifest.shards("train")
        count = manifest.count("train")
    except ShardError as e:
        print(f"bench_io: {e}", file=sys.stderr)
        return 2
    if refusal := check_sizes(cfg, grid, count):
        print(f"bench_io: {refusal}", file=sys.stderr)
        return 2
    data = {
        "shards": cfg.shards if is_url(cfg.shards) else str(Path(cfg.shards).resolve()),
        "train_images": count,
        "preprocessing": manifest.raw.get("preprocessing"),
        "mmap": MMAP,  # shards read with read() (False) or mapped
    }
    report = {"machine": describe_machine(), "config": to_json(cfg), "data": data}
    record = Record(Path(cfg.json) if cfg.json else None, report)
    bench = Bench(cfg, manifest, partial(make_step, cfg, manifest.num_classes), AMP_DTYPES[cfg.amp] or torch.float32)
    # SIGTERM (a time cap) ends the run through Python, so the table below still shows what was measured.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run(bench, grid, record)
    except ShardError as e:
        print(f"bench_io: {e}", file=sys.stderr)
        return 2
    finally:
        print(table(record.report), flush=True)
    if cfg.plot:
        write_plot(Path(cfg.plot), record.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
