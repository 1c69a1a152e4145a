"""bench_io's modes: the DALI loader alone and across its epoch boundary, the training step alone, both together,
the trace, the sweep's trials and the baseline; run() measures them in order, each figure into the report."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from pipeline import DaliLoader
from pipeline.baseline import baseline_loader, device_batches
from pipeline.bench.report import Record
from pipeline.bench.sweep import HEADER, SWEPT, best_line, coordinate_search, sweep_grid, trial_row
from pipeline.bench.timing import (
    Clock,
    CpuMeter,
    boundary_stall,
    peak_memory,
    release_pools,
    summarise,
    time_windows,
    warm_up,
)
from pipeline.manifest import Manifest

# Shorter windows than this are flagged: CPU time is counted in 10 ms ticks, and a ratio of two such windows (overlap,
# cores used) can come out above its bound. A GPU window of 20 steps at 25,000 img/s lasts 0.2 s.
MIN_WINDOW_S = 0.1
TRACE_STEPS = 4


def check_sizes(cfg, grid: dict, count: int) -> str | None:
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
    """The modes; training steps are built once per batch size and shared by `model` and both ends to end.

    cfg: tools/bench_io.py's settings; make_step(tower_convs) builds run.py's training step on a fresh model, which
    takes batches of `dtype` images."""

    def __init__(self, cfg, manifest: Manifest, make_step: Callable[[str], Callable], dtype: torch.dtype):
        self.cfg, self.manifest, self.make_step, self.dtype = cfg, manifest, make_step, dtype
        self.cuda = cfg.device == "cuda"
        self.clock = Clock(cfg.device)
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
            self._steps[key] = self.make_step(key[1])
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


def run(bench: Bench, grid: dict, record: Record) -> None:
    """Every figure into `record` as it is measured, the most wanted first: the DALI modes, the baseline, the towers."""
    cfg = bench.cfg
    setting = {k: getattr(cfg, k) for k in SWEPT}
    bench.dali(setting).close()  # the loader's checks (index files, crop vs image size) before anything runs
    if cfg.sweep:
        grid = grid or sweep_grid(setting, psutil.cpu_count(), bench.cuda, bench.manifest.count("train"))
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
