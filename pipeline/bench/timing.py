"""How bench_io times: warm-up excluded, windows marked on the stream (CUDA events), median of windows; the
epoch-boundary stall; CPU use; the memory held; the machine measured."""

from __future__ import annotations

import contextlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

import psutil
import torch


class Clock:
    """Marks on the training stream's timeline: CUDA events on a GPU, read once at the end, so no window ends with
    a device-wide sync that would also drain DALI's prefetch (and hide how far input and compute overlap);
    perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, marks: list) -> list[float]:
        """The time between consecutive marks; on a GPU this waits for the last one."""
        if not self.cuda:
            return [b - a for a, b in pairwise(marks)]
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in pairwise(marks)]


def warm_up(step: Callable[[], None], steps: int) -> None:
    for _ in range(steps):
        step()


def time_windows(
    step: Callable[[], None], windows: int, steps: int, clock: Clock, on_window: Callable[[], object] = lambda: None
) -> list[float]:
    """Seconds of each of `windows` back-to-back runs of `steps` calls, from one mark to the next."""
    marks = [clock.mark()]
    for _ in range(windows):
        for _ in range(steps):
            step()
        marks.append(clock.mark())
        on_window()
    return clock.seconds(marks)


def summarise(seconds: list[float], images_per_window: int) -> dict:
    """Images/s as the median over windows, with min, max and spread (max - min) / median in percent."""
    rates = [images_per_window / s for s in seconds]
    median = statistics.median(rates)
    return {
        "img_per_s": median,
        "img_per_s_min": min(rates),
        "img_per_s_max": max(rates),
        "spread_pct": 100.0 * (max(rates) - min(rates)) / median,
        "windows": len(rates),
        "images_per_window": images_per_window,
        "seconds": sum(seconds),
    }


def boundary_stall(seconds: list[float], first: int, around: int = 2) -> dict:
    """The longest of the steps within `around` of an epoch's first (seconds[first]), in median steps."""
    longest = max(seconds[max(0, first - around) : first + around + 1])
    median = statistics.median(seconds)
    return {"longest_s": longest, "median_step_s": median, "stall_steps": longest / median, "steps": len(seconds)}


class CpuMeter:
    """CPU used while the block runs: cores busy in this process and its workers, and the whole machine's load.

    The process tree counts DALI's threads (in-process) and DataLoader workers (child processes) alike;
    the machine-wide figure also shows whoever else shares the machine.
    """

    def __enter__(self) -> CpuMeter:
        self._proc = psutil.Process()
        psutil.cpu_percent(None)
        self._start_cpu, self._start = self._tree_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        self.result = {
            "cores_used": (self._tree_cpu_seconds() - self._start_cpu) / wall,
            "machine_cpu_pct": psutil.cpu_percent(None),
            "cores": psutil.cpu_count(),
        }

    def _tree_cpu_seconds(self) -> float:
        total = 0.0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:  # a worker that exited between listing and reading
                continue
            total += t.user + t.system
        return total


def release_pools(device: str) -> None:
    """Hand back what DALI's and torch's pools hold unused, and restart torch's peak, so that a later peak_memory
    reading belongs to what runs after (pools otherwise keep the size an earlier, larger pipeline grew them to)."""
    if device != "cuda":
        return
    from nvidia.dali.backend import ReleaseUnusedMemory

    ReleaseUnusedMemory()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    """GiB held so far: this process's peak RSS, and on a GPU the device's memory in use with torch's share of it.

    DALI's pools have no public counter; they are most of `gpu_other_gib` (the device's use beyond torch's pool,
    CUDA contexts included). Pools keep what they grew to, so a reading after the run is its peak."""
    gib = 2.0**30
    r = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib}  # Linux counts KiB
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        r["gpu_used_gib"], r["gpu_torch_gib"] = (total - free) / gib, torch.cuda.max_memory_reserved() / gib
        r["gpu_other_gib"] = r["gpu_used_gib"] - torch.cuda.memory_reserved() / gib
    return r


def describe_machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, GPU and driver, library versions, date."""
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host_os": platform.platform(),
        "cpu": _cpu_model(),
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1min": round(psutil.getloadavg()[0], 2),  # others' work on a shared machine skews the figures
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count(),
        "driver": _nvidia_driver() if gpu else None,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dali": dali_version,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    """The kernel driver's version: /proc where the module exposes it, else nvidia-smi."""
    with contextlib.suppress(OSError):
        for word in Path("/proc/driver/nvidia/version").read_text().split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.splitlines()[0].strip()
    return None
