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

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from model import AlexNet
from model.alexnet import TOWER_CONVS
from model.train.config import SAVED_SETTINGS, alexnet_refuses
from model.train.recipe import AMP_DTYPES, ComputeSettings, make_train_step, sgd
from pipeline import DaliLoader
from pipeline.baseline import baseline_loader, device_batches
from pipeline.bench.report import Record, table, write_plot
from pipeline.bench.sweep import HEADER, KINDS, SWEPT, best_line, coordinate_search, parse_values, sweep_grid, trial_row
from pipeline.bench.timing import (
    Clock,
    CpuMeter,
    boundary_stall,
    describe_machine,
    peak_memory,
    release_pools,
    summarise,
    time_windows,
    warm_up,
)
from pipeline.cache import CacheSettings, local_shards
from pipeline.graphs import MMAP
from pipeline.manifest import Manifest, ShardError, load_manifest
from pipeline.settings import LoaderSettings, at_least, option, parse, refused, show, to_json
from pipeline.store import is_url
from pipeline.threads import default_threads

# --quick: about a minute on a 2-core CPU, where one training step of the 60M-parameter model takes seconds
QUICK = {"steps": 2, "windows": 3, "warmup": 1}
QUICK_CPU = {"batch_size": 32, "crop_size": 64}
# Shorter windows than this are flagged: CPU time is counted in 10 ms ticks, and a ratio of two such windows (overlap,
# cores used) can come out above its bound. A GPU window of 20 steps at 25,000 img/s lasts 0.2 s.
MIN_WINDOW_S = 0.1
TRACE_STEPS = 4
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


def check_sizes(cfg: BenchConfig, grid: dict, count: int) -> str | None:
    """Batch sizes the data and the machine can hold, before anything runs: at most the split's images, and the
    batches in flight (the baseline's two per worker, DALI's prefetch, the step's) within half the free memory."""
    available = psutil.virtual_memory().available
    for batch in sorted({cfg.batch_size, *grid.get("batch_size", ())}):
        if batch > count:
            return f"--batch-size {batch}: more than the {count} training images in {cfg.shards}; pick at most {count}"
        held = batch * 3 * cfg.crop_size**2 * 4 * (2 * cfg.workers + cfg.prefetch + 4)
        if held > available / 2:
            return (
                f"--batch-size {batch} at --crop-size {cfg.crop_size}: about {held / 2**30:.1f} GiB of batches in "
                f"flight, more than half the {available / 2**30:.1f} GiB free here; pick a smaller batch"
            )
    return None


def endless(loader) -> Iterator:
    """Batches across epoch boundaries, as a training run sees them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Bench:
    """The modes; training steps are built once per batch size and shared by `model` and both ends to end."""

    def __init__(self, cfg: BenchConfig, manifest: Manifest):
        self.cfg, self.manifest = cfg, manifest
        self.cuda = cfg.device == "cuda"
        self.clock = Clock(cfg.device)
        self.dtype = AMP_DTYPES[cfg.amp] or torch.float32
        self._steps = {}
        self._stream = None
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # as run.py

    def train_step(self, batch_size: int, tower_convs: str | None = None):
        key = (batch_size, tower_convs or self.cfg.tower_convs[0])
        if key not in self._steps:
            if self.cfg.compile != "off":
                # Each new step would otherwise recompile the one code object (make_train_step's loss) that the
                # others compiled: later batch sizes get dynamic-batch kernels, and past 8 it falls back to eager.
                torch._dynamo.reset()
                self._steps.clear()
            torch.manual_seed(self.cfg.seed)
            model = AlexNet(num_classes=self.manifest.num_classes, tower_convs=key[1])
            model = model.to(self.cfg.device, memory_format=torch.channels_last)
            compile = False if self.cfg.compile == "off" else self.cfg.compile
            self._steps[key] = make_train_step(model, sgd(model), self.cfg.amp, compile)
        return self._steps[key]

    def stream(self, s: dict):
        """The stream a setting trains on: torch's current (legacy default) one, or a dedicated torch.cuda.Stream."""
        if s.get("stream", "default") == "default":
            return contextlib.nullcontext()
        self._stream = self._stream or torch.cuda.Stream()
        return torch.cuda.stream(self._stream)

    def dali(self, s: dict) -> DaliLoader:
        c = self.cfg
        loader = replace(c, **{k: s[k] for k in SWEPT})  # the stream is not the loader's
        return DaliLoader(self.manifest, "train", loader, device=c.device, seed=c.seed, dtype=self.dtype)

    def measure(self, name: str, step: Callable[[], None], batch_size: int, reset=lambda: None) -> dict:
        """Warm up, then time the windows with CPU use recorded; `reset` clears counters warm-up touched."""
        warm_up(step, self.cfg.warmup)
        reset()
        with tqdm(total=self.cfg.windows, desc=f"{name:<8}", unit="window", leave=False) as bar, CpuMeter() as cpu:
            seconds = time_windows(step, self.cfg.windows, self.cfg.steps, self.clock, bar.update)
        r = summarise(seconds, batch_size * self.cfg.steps)
        # Per core of CPU time this process tree used: comparable across loaders on a machine others load too.
        r["img_per_s_per_core"] = r["img_per_s"] / max(cpu.result["cores_used"], 1e-9)
        short = "windows of one step" if self.cfg.steps == 1 else None
        short = short or (f"windows under {MIN_WINDOW_S:g} s" if min(seconds) < MIN_WINDOW_S else None)
        return {**r, "batch_size": batch_size, "cpu": cpu.result, "indicative": short}

    def loader_alone(self, loader: DaliLoader, batches: Iterator, batch_size: int) -> dict:
        r = self.measure("loader", lambda: next(batches), batch_size)
        return {**r, "epoch_boundary": self.epoch_boundary(loader, batches)}

    def epoch_boundary(self, loader: DaliLoader, batches: Iterator, after: int = 3) -> dict:
        """Each step's time (marks on the stream, prefetch left running) on to `after` steps past the next epoch
        boundary: the longest step around the boundary, in median steps (the training thread's stall there)."""
        first = len(loader) - loader.step  # the next epoch's first batch is this many steps ahead
        marks = [self.clock.mark()]
        for _ in tqdm(range(first + after), desc="boundary", unit="step", leave=False):
            next(batches)
            marks.append(self.clock.mark())
        return boundary_stall(self.clock.seconds(marks), first)

    def model_alone(self, batch_size: int, tower_convs: str | None = None) -> dict:
        c = self.cfg
        images = torch.randn(batch_size, 3, c.crop_size, c.crop_size, device=c.device).to(
            self.dtype, memory_format=torch.channels_last
        )
        labels = torch.randint(0, self.manifest.num_classes, (batch_size,), device=c.device)
        step = self.train_step(batch_size, tower_convs)
        return self.measure("model", lambda: step(images, labels), batch_size)

    def end_to_end(self, batches: Iterator, batch_size: int, held=lambda: 0.0, name="e2e") -> dict:
        """The step fed by a loader, with the share of wall time spent waiting for data and keeping the GPU busy.

        data_wait_frac: host time blocked in next(loader) over wall time, less the time a DaliLoader held back a host
        that ran ahead of the GPU (`held`, its gpu_wait_s: the GPU was busy then, not waiting). gpu_busy_frac: the span
        of each step on the training stream (CUDA events recorded before and after it) summed, over wall time;
        1 - busy is the time the training stream sat idle, waiting for data or for the host. torch.cuda.utilization
        (NVML) is not used: it samples at about 1/6 s and counts DALI's own kernels as busy.
        """
        train = self.train_step(batch_size)
        waited, spans = [0.0], []

        def step():
            start, before = time.perf_counter(), held()
            images, labels = next(batches)
            waited[0] += time.perf_counter() - start - (held() - before)
            if not self.cuda:
                train(images, labels)
                return
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            train(images, labels)
            end.record()
            spans.append((begin, end))

        def reset():
            waited[0] = 0.0
            spans.clear()

        r = self.measure(name, step, batch_size, reset)
        r["data_wait_frac"] = waited[0] / r["seconds"]
        if self.cuda:
            r["gpu_busy_frac"] = sum(b.elapsed_time(e) for b, e in spans) / 1e3 / r["seconds"]
        return r

    def trace(self, batches: Iterator, batch_size: int, path: Path) -> None:
        """A profile of TRACE_STEPS end-to-end steps, written where a browser's Perfetto (or chrome://tracing) opens
        it: 'data wait' around next(loader) (holding DaliLoader's 'DALI run'), 'training step' around the step."""
        from torch.profiler import ProfilerActivity, profile, record_function

        train = self.train_step(batch_size)
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda) as prof:
            for _ in range(TRACE_STEPS):
                with record_function("data wait"):
                    images, labels = next(batches)
                with record_function("training step"):
                    train(images, labels)
            if self.cuda:
                torch.cuda.synchronize()
        part = path.with_name(f".{path.name}.part{''.join(path.suffixes[-2:])}")  # the suffix: .gz compresses
        prof.export_chrome_trace(str(part))
        os.replace(part, path)

    def dali_modes(self, s: dict, record: Record) -> None:
        """loader, model and e2e at one setting (the loader's stream continues from `loader` into `e2e`), the memory
        they held, and the trace."""
        with self.dali(s) as loader, self.stream(s):
            batches = endless(loader)
            record["loader"] = self.loader_alone(loader, batches, s["batch_size"])
            record["model"] = self.model_alone(s["batch_size"])
            record["e2e"] = self.end_to_end(batches, s["batch_size"], lambda: loader.gpu_wait_s)
            # The training part's own peak: the loader and the step, before the baseline's workers and pinned
            # batches add to this process; while the loader still holds its buffers.
            record["memory"] = {**peak_memory(self.cfg.device), "after_sweep": self.cfg.sweep}
            if self.cfg.trace:
                try:
                    self.trace(batches, s["batch_size"], Path(self.cfg.trace))
                    print(f"trace of {TRACE_STEPS} end-to-end steps: {self.cfg.trace}", flush=True)
                except RuntimeError as e:  # a profiler that cannot start costs the trace, not the figures after it
                    print(f"trace: not written: {str(e).splitlines()[0]}", flush=True)

    def sweep_trial(self, s: dict) -> dict:
        """The loader alone (which shows whether the hardware decoder takes part), then end to end, at one --sweep
        setting; printed as a row when done."""
        with self.dali(s) as loader, self.stream(s):
            batches = endless(loader)
            alone = self.measure("loader", lambda: next(batches), s["batch_size"])
            r = self.end_to_end(batches, s["batch_size"], lambda: loader.gpu_wait_s)
        r = {
            "img_per_s": r["img_per_s"],
            "loader_img_per_s": alone["img_per_s"],
            "data_wait_frac": r["data_wait_frac"],
            "gpu_busy_frac": r.get("gpu_busy_frac"),
        }
        print(trial_row({**s, **r}), flush=True)
        return r

    def baseline_modes(self, batch_size: int, record: Record) -> None:
        """The DataLoader + Pillow baseline alone, then feeding the same training step, with as many workers as
        DALI has threads unless told otherwise. Its workers start from a fresh server process (forkserver): a fork
        of this one would copy DALI's running threads."""
        c = self.cfg
        loader = baseline_loader(
            self.manifest,
            batch_size,
            crop_size=c.crop_size,
            workers=c.workers,
            seed=c.seed,
            divide_std=c.divide_std,
            pin_memory=self.cuda,
            start="forkserver",
        )
        batches = device_batches(loader, c.device, self.dtype)
        try:
            record["baseline"] = {**self.measure("baseline", lambda: next(batches), batch_size), "workers": c.workers}
            e2e = self.end_to_end(batches, batch_size, name="base e2e")
            record["baseline_e2e"] = {**e2e, "workers": c.workers}
        finally:
            batches.close()  # drops the DataLoader iterator, which stops its worker processes


def run(cfg: BenchConfig, grid: dict, manifest: Manifest, record: Record) -> None:
    """Every figure into `record` as it is measured, the most wanted first: the DALI modes, the baseline, the towers."""
    bench = Bench(cfg, manifest)
    setting = {k: getattr(cfg, k) for k in SWEPT}
    bench.dali(setting).close()  # the loader's checks (index files, crop vs image size) before anything runs
    if cfg.sweep:
        grid = grid or sweep_grid(setting, psutil.cpu_count(), bench.cuda, manifest.count("train"))
        record["sweep"] = {"grid": grid, "trials": []}
        print(HEADER, flush=True)

        def trial(s: dict) -> dict:
            r = bench.sweep_trial(s)
            record["sweep"]["trials"].append({**s, **r})
            record.save()
            return r

        setting, _ = coordinate_search(grid, setting, trial)
        record["sweep"] = {**record["sweep"], "best": setting}
        print(best_line(setting), flush=True)
        release_pools(cfg.device)  # the memory figure below is then the best setting's, not the largest trial's
    record["setting"] = setting
    bench.dali_modes(setting, record)
    if cfg.baseline:
        bench.baseline_modes(setting["batch_size"], record)
    if len(cfg.tower_convs) > 1:
        towers = {cfg.tower_convs[0]: record["model"]}
        for t in cfg.tower_convs[1:]:
            towers[t] = bench.model_alone(setting["batch_size"], t)
            record["towers"] = towers
            print(f"model alone, {t} towers: {towers[t]['img_per_s']:,.1f} img/s", flush=True)


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
    # SIGTERM (a time cap) ends the run through Python, so the table below still shows what was measured.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run(cfg, grid, manifest, record)
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
