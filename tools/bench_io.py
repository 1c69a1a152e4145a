"""Will the GPU wait on data? The DALI loader, the training step, both together, and plain PyTorch, in one run.

    python tools/bench_io.py --shards DIR [--batch-size 256 --compile] [--sweep] [--json FILE] [--plot FILE]
    python tools/bench_io.py --config runs/alexnet/config.json --shards DIR     the loader setting of a training run

Modes, all on the same shards: `loader` (DaliLoader alone, then on across its next epoch boundary: up to an epoch,
~1 minute of ImageNet on an H100), `model` (run.py's training step on synthetic
batches already on the device: the compute ceiling), `e2e` (that step fed by that loader) and `baseline`
(torch DataLoader + webdataset + Pillow workers doing the same augmentation, pipeline/baseline.py).
Each figure is the median images/s of --windows back-to-back windows of --steps steps, after --warmup steps; on a GPU
the windows are CUDA events on the training stream, so DALI's prefetch keeps running across them.
The JSON holds `machine`, `config`, `data`, `setting` (the DALI setting timed, after --sweep the best one), one
object per mode and the derived `overlap`, `speedup_vs_baseline`, `loader_vs_baseline` (and `sweep`). With
--tower-convs dense grouped split the model alone is also timed with each other way of running the towers
(`towers`); the first one named is the one every mode uses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from model import AlexNet
from model.alexnet import TOWER_CONVS
from model.train.recipe import AMP_DTYPES, ComputeSettings, make_train_step, sgd
from pipeline import DaliLoader
from pipeline.baseline import baseline_loader, device_batches
from pipeline.bench.report import derive, table, write_json, write_plot
from pipeline.bench.sweep import HEADER, SWEPT, best_line, coordinate_search, parse_values, sweep_grid, trial_row
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
from pipeline.settings import LoaderSettings, at_least, option, parse, show, to_json
from pipeline.store import is_url
from pipeline.threads import default_threads

# --quick: about a minute on a 2-core CPU, where one training step of the 60M-parameter model takes seconds
QUICK = {"steps": 2, "windows": 3, "warmup": 1}
QUICK_CPU = {"batch_size": 32, "crop_size": 64}


def writable(path) -> bool:
    return Path(path).resolve().parent.is_dir()


@dataclass(kw_only=True)
class BenchConfig(LoaderSettings, ComputeSettings, CacheSettings):
    """What is timed, and how"""

    shards: str = option(help="shard folder written by tools/shard_imagenet.py, or its s3:// or gs:// URL")
    workers: int = option(
        help="baseline DataLoader processes: one per core", check=at_least(1), default_factory=psutil.cpu_count
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
    sweep: bool = option(False, "tune batch size, threads, hw_decoder_load and prefetch first")
    sweep_values: tuple[str, ...] = option(
        (),
        f"KNOB=V,V ...: sweep only these values (KNOB one of "
        f"{', '.join(SWEPT)}; implies --sweep), e.g. hw_decoder_load=1,0.65,0",
    )
    quick: bool = option(False, "short windows: 2 steps, 3 windows, 1 warm-up step; on the CPU also batch 32, crop 64")
    json: str | None = option(
        None,
        "write every figure and the machine here",
        check=(writable, "in a folder that exists; create it or pick another path"),
    )
    plot: str | None = option(
        None, "write a PNG bar chart here", check=(writable, "in a folder that exists; create it or pick another path")
    )


def quick_preset(given: dict) -> dict:
    device = ComputeSettings(device=given.get("device", "auto")).resolve_device()["device"]
    return {**QUICK, **(QUICK_CPU if device == "cpu" else {})} if given.get("quick") else {}


def parse_args(argv: list[str] | None) -> BenchConfig:
    """Declared defaults, then the --quick preset, then --config, then whatever was given on the command line."""
    cfg, p = parse(BenchConfig, argv, prog="tools/bench_io.py", description=__doc__, preset=quick_preset)
    try:
        dict(map(parse_values, cfg.sweep_values))
    except ValueError as e:
        p.error(f"--sweep-values {e}")
    cfg = replace(
        cfg, **cfg.resolve_device(), threads=cfg.threads or default_threads(), sweep=cfg.sweep or bool(cfg.sweep_values)
    )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; leave --device out to use the CPU")
    return cfg


def endless(loader) -> Iterator:
    """Batches across epoch boundaries, as a training run sees them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Bench:
    """The four modes; training steps are built once per batch size and shared by `model` and `e2e`."""

    def __init__(self, cfg: BenchConfig, manifest: Manifest):
        self.cfg, self.manifest = cfg, manifest
        self.cuda = cfg.device == "cuda"
        self.clock = Clock(cfg.device)
        self.dtype = AMP_DTYPES[cfg.amp] or torch.float32
        self._steps = {}
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

    def dali(self, s: dict) -> DaliLoader:
        c = self.cfg
        return DaliLoader(self.manifest, "train", replace(c, **s), device=c.device, seed=c.seed, dtype=self.dtype)

    def measure(self, name: str, step: Callable[[], None], batch_size: int, reset=lambda: None) -> dict:
        """Warm up, then time the windows with CPU use recorded; `reset` clears counters warm-up touched."""
        warm_up(step, self.cfg.warmup)
        reset()
        with tqdm(total=self.cfg.windows, desc=f"{name:<8}", unit="window", leave=False) as bar, CpuMeter() as cpu:
            seconds = time_windows(step, self.cfg.windows, self.cfg.steps, self.clock, bar.update)
        r = summarise(seconds, batch_size * self.cfg.steps)
        # Per core of CPU time this process tree used: comparable across loaders on a machine others load too.
        r["img_per_s_per_core"] = r["img_per_s"] / max(cpu.result["cores_used"], 1e-9)
        return {**r, "batch_size": batch_size, "cpu": cpu.result}

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

    def end_to_end(self, loader: DaliLoader, batches: Iterator, batch_size: int) -> dict:
        """The step fed by the loader, with the share of wall time spent waiting for data and keeping the GPU busy.

        data_wait_frac: host time blocked in next(loader) over wall time, less the time the loader held back a host
        that ran ahead of the GPU (loader.gpu_wait_s: the GPU was busy then, not waiting). gpu_busy_frac: the span of
        each step on the training stream (CUDA events recorded before and after it) summed, over wall time; 1 - busy
        is the time the training stream sat idle, waiting for data or for the host. torch.cuda.utilization (NVML) is not
        used: it samples at about 1/6 s and counts DALI's own kernels as busy, so it cannot tell training from decoding.
        """
        train = self.train_step(batch_size)
        waited, spans = [0.0], []

        def step():
            start, held = time.perf_counter(), loader.gpu_wait_s
            images, labels = next(batches)
            waited[0] += time.perf_counter() - start - (loader.gpu_wait_s - held)
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

        r = self.measure("e2e", step, batch_size, reset)
        r["data_wait_frac"] = waited[0] / r["seconds"]
        if self.cuda:
            r["gpu_busy_frac"] = sum(b.elapsed_time(e) for b, e in spans) / 1e3 / r["seconds"]
        return r

    def dali_modes(self, s: dict) -> dict:
        """loader, model and e2e at one setting; the loader's stream continues from `loader` into `e2e`."""
        with self.dali(s) as loader:
            batches = endless(loader)
            r = {
                "loader": self.loader_alone(loader, batches, s["batch_size"]),
                "model": self.model_alone(s["batch_size"]),
                "e2e": self.end_to_end(loader, batches, s["batch_size"]),
            }
            return {**r, "memory": peak_memory(self.cfg.device)}  # while the loader still holds its buffers

    def sweep_trial(self, s: dict) -> dict:
        """The loader alone (which shows whether the hardware decoder takes part), then end to end, at one --sweep
        setting; printed as a row when done."""
        with self.dali(s) as loader:
            batches = endless(loader)
            alone = self.measure("loader", lambda: next(batches), s["batch_size"])
            r = self.end_to_end(loader, batches, s["batch_size"])
        r = {
            "img_per_s": r["img_per_s"],
            "loader_img_per_s": alone["img_per_s"],
            "data_wait_frac": r["data_wait_frac"],
            "gpu_busy_frac": r.get("gpu_busy_frac"),
        }
        print(trial_row({**s, **r}), flush=True)
        return r

    def baseline(self) -> dict:
        c = self.cfg
        loader = baseline_loader(
            self.manifest,
            c.batch_size,
            crop_size=c.crop_size,
            workers=c.workers,
            seed=c.seed,
            divide_std=c.divide_std,
            pin_memory=self.cuda,
        )
        batches = device_batches(loader, c.device, self.dtype)
        try:
            return {**self.measure("baseline", lambda: next(batches), c.batch_size), "workers": c.workers}
        finally:
            batches.close()  # drops the DataLoader iterator, which stops its worker processes


def run(cfg: BenchConfig, manifest: Manifest) -> dict:
    bench = Bench(cfg, manifest)
    report = {
        "machine": describe_machine(),
        "config": to_json(cfg),
        "data": {
            "shards": cfg.shards if is_url(cfg.shards) else str(Path(cfg.shards).resolve()),
            "train_images": manifest.count("train"),
            "preprocessing": manifest.raw.get("preprocessing"),
            "mmap": MMAP,  # shards read with read() (False) or mapped
        },
    }
    setting = {k: getattr(cfg, k) for k in SWEPT}
    bench.dali(setting).close()  # the loader's checks (index files, crop vs image size) before anything runs
    # The baseline forks its workers first, before DALI's threads exist in this process.
    report["baseline"] = bench.baseline()
    if cfg.sweep:
        grid = dict(map(parse_values, cfg.sweep_values)) or sweep_grid(setting, psutil.cpu_count(), bench.cuda)
        print(HEADER, flush=True)
        setting, trials = coordinate_search(grid, setting, bench.sweep_trial)
        print(best_line(setting))
        report["sweep"] = {"grid": grid, "trials": trials, "best": setting}
        release_pools(cfg.device)  # the memory figure below is then the best setting's, not the largest trial's
    report["setting"] = setting
    report.update(bench.dali_modes(setting))
    report["memory"]["after_sweep"] = cfg.sweep
    if len(cfg.tower_convs) > 1:
        report["towers"] = {
            cfg.tower_convs[0]: report["model"],
            **{t: bench.model_alone(setting["batch_size"], t) for t in cfg.tower_convs[1:]},
        }
    report.update(derive(report))
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    print(show(cfg), flush=True)
    try:
        manifest = load_manifest(local_shards(cfg.shards, cfg.cache_dir))
        manifest.shards("train")
        report = run(cfg, manifest)
    except ShardError as e:
        print(f"bench_io: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if cfg.json:
        write_json(Path(cfg.json), report)
    if cfg.plot:
        write_plot(Path(cfg.plot), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
