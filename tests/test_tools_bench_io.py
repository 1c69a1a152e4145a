"""tools/bench_io.py: the derived ratios, the window timer, the sweep search, the baseline's augmentation against
NumPy, and a --quick run on the demo shards with every mode in its JSON and a PNG."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment import crop_anchor
from pipeline.baseline import augment, baseline_loader, device_batches
from pipeline.bench.report import MODES, derive, overlap, speedup
from pipeline.bench.sweep import coordinate_search, parse_values, sweep_grid
from pipeline.bench.timing import Clock, boundary_stall, summarise, time_windows
from pipeline.manifest import load_manifest
from tools import bench_io

ROOT = Path(__file__).resolve().parents[1]


def test_overlap_and_speedups():
    assert overlap(e2e=900.0, loader=1000.0, model=1200.0) == pytest.approx(0.9)
    assert overlap(e2e=900.0, loader=3000.0, model=1000.0) == pytest.approx(0.9)  # the lower ceiling counts
    assert speedup(2600.0 * 8, 2600.0) == pytest.approx(8.0)
    results = {
        "loader": {"img_per_s": 30000.0},
        "model": {"img_per_s": 25000.0},
        "e2e": {"img_per_s": 22500.0},
        "baseline": {"img_per_s": 2500.0},
    }
    assert derive(results) == pytest.approx({"overlap": 0.9, "speedup_vs_baseline": 9.0, "loader_vs_baseline": 12.0})


def test_summarise_is_median_of_windows_with_spread():
    r = summarise([1.0, 2.0, 0.5, 4.0, 1.0], images_per_window=100)
    assert r["img_per_s"] == 100.0  # rates 100, 50, 200, 25, 100: median 100, not the mean
    assert (r["img_per_s_min"], r["img_per_s_max"]) == (25.0, 200.0)
    assert r["spread_pct"] == pytest.approx(175.0)
    assert (r["windows"], r["seconds"]) == (5, 8.5)


def test_boundary_stall_is_the_longest_step_near_the_boundary_in_median_steps():
    seconds = [0.1] * 10 + [0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]  # the 0.9 s step is far from the boundary
    r = boundary_stall(seconds, first=12)
    assert r == pytest.approx({"longest_s": 0.7, "median_step_s": 0.1, "stall_steps": 7.0, "steps": 17})
    assert boundary_stall([0.2, 0.1, 0.1], first=0)["stall_steps"] == pytest.approx(2.0)


class LogClock:
    """A Clock whose marks are numbered; it logs when it is marked and when it is read."""

    def __init__(self, log):
        self.log, self.marks = log, 0

    def mark(self):
        self.log.append("mark")
        self.marks += 1
        return float(self.marks**2)

    def seconds(self, marks):
        self.log.append("read")
        return Clock("cpu").seconds(marks)


def test_time_windows_marks_back_to_back_and_reads_the_clock_once():
    """No window ends in a device-wide sync (which would drain DALI's prefetch): one mark per boundary, one read."""
    log = []
    seconds = time_windows(
        lambda: log.append("step"), windows=3, steps=4, clock=LogClock(log), on_window=lambda: log.append("window")
    )
    assert log == ["mark"] + (["step"] * 4 + ["mark", "window"]) * 3 + ["read"]
    assert seconds == [3.0, 5.0, 7.0]  # marks at 1, 4, 9, 16: consecutive differences


def test_cpu_clock_measures_wall_time():
    clock = Clock("cpu")
    marks = [clock.mark()]
    time.sleep(0.05)
    marks.append(clock.mark())
    assert clock.seconds(marks)[0] >= 0.05


@pytest.mark.gpu
def test_cuda_clock_times_the_stream_without_a_host_sync():
    """A window of queued GPU work is timed in full though the host queued it at once and never waited."""
    clock = Clock("cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        marks = [clock.mark()]
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time at 2 GHz
        marks.append(clock.mark())
        queued = time.perf_counter() - start
    finally:
        torch.cuda.set_sync_debug_mode("default")
    (window,) = clock.seconds(marks)
    torch.cuda.synchronize()
    assert queued < window <= time.perf_counter() - start  # the host returned before the GPU was done


def test_parse_values_reads_a_grid_and_rejects_bad_knobs():
    assert parse_values("hw_decoder_load=1,0.65,0") == ("hw_decoder_load", [1.0, 0.65, 0.0])
    assert parse_values("threads=16") == ("threads", [16])
    for bad in ("threads=many", "lr=0.1", "threads="):
        with pytest.raises(ValueError, match=r"threads|KNOB"):
            parse_values(bad)


def test_sweep_values_set_the_grid_and_imply_sweep(demo_shards, capsys):
    cfg = bench_io.parse_args(
        ["--shards", str(demo_shards), "--sweep-values", "hw_decoder_load=1,0.65,0", "threads=16"]
    )
    grid = dict(map(parse_values, cfg.sweep_values))
    assert cfg.sweep and grid == {"hw_decoder_load": [1.0, 0.65, 0.0], "threads": [16]}
    with pytest.raises(SystemExit) as e:
        bench_io.parse_args(["--shards", str(demo_shards), "--sweep-values", "threads=x"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_coordinate_search_tunes_one_knob_at_a_time_without_remeasuring():
    peak = {"batch_size": 256, "threads": 8, "hw_decoder_load": 0.8, "prefetch": 3}
    calls = []

    def measure(s):
        calls.append(dict(s))
        return {"img_per_s": 1000.0 - sum(abs(s[k] - peak[k]) for k in peak)}

    start = {"batch_size": 128, "threads": 4, "hw_decoder_load": 0.65, "prefetch": 2}
    grid = sweep_grid(start, cores=16, cuda=True)
    best, trials = coordinate_search(grid, start, measure)
    assert best == peak
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls}) == len(trials)
    assert len(calls) == 1 + sum(len(v) for v in grid.values()) - len(grid)  # the start point is measured once


def test_sweep_grid():
    start = {"batch_size": 64, "threads": 3, "hw_decoder_load": 0.65, "prefetch": 2}
    cpu = sweep_grid(start, cores=2, cuda=False)
    assert cpu == {
        "batch_size": [32, 64, 128],
        "threads": [1, 2, 3],
        "hw_decoder_load": [0.65],
        "prefetch": [1, 2, 3, 4],
    }
    gpu = sweep_grid(start, cores=16, cuda=True)
    assert gpu["threads"] == [1, 2, 3, 4, 8, 16] and gpu["hw_decoder_load"] == [0.0, 0.5, 0.65, 0.8, 1.0]


def test_baseline_augment_matches_numpy():
    h, w, size = 37, 50, 24
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0])
    eigval, eigvec = np.array([0.2, 0.02, 0.005]), np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))[0]
    for seed in range(6):  # both flip outcomes among them
        out = augment(Image.fromarray(pixels), np.random.default_rng(seed), size, mean, std, eigval, eigvec)
        rng = np.random.default_rng(seed)
        x, y, flip, alpha = rng.random(), rng.random(), rng.random() < 0.5, rng.normal(0, 0.1, 3)
        left, top = crop_anchor(x, w, size), crop_anchor(y, h, size)
        want = pixels[top : top + size, left : left + size].astype(np.float64)
        want = want[:, ::-1] if flip else want
        offset = 255 * sum(alpha[i] * eigval[i] * eigvec[:, i] for i in range(3))  # §4.1, column i = p_i
        want = ((want + offset - mean) / std).transpose(2, 0, 1)
        assert out.dtype == np.float32 and out.shape == (3, size, size)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-4)


def first_batch(loader, device, dtype):
    """The baseline's first batch on `device`, its workers shut down after."""
    batches = device_batches(loader, device, dtype)
    try:
        return next(batches)
    finally:
        batches.close()


def test_baseline_batches_look_like_the_dali_loaders(demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    loader = baseline_loader(load_manifest(demo_shards), 8, crop_size=48, workers=1, seed=0, divide_std=True)
    images, labels = first_batch(loader, "cpu", torch.float16)
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < len(manifest["classes"])
    assert images.float().abs().mean() < 3  # mean-subtracted and divided by std: a few units, not 0-255 pixels


def test_baseline_default_subtracts_the_mean_only(demo_shards):
    loader = baseline_loader(load_manifest(demo_shards), 8, crop_size=48, workers=1, seed=0)
    images, _ = first_batch(loader, "cpu", torch.float32)
    # §2: centred 0-255 pixels, a spread of tens of units; divided by the std it would be about one.
    assert abs(images.mean()) < 30 and images.std() > 10


@pytest.mark.gpu
def test_baseline_batches_land_on_the_gpu(demo_shards):
    loader = baseline_loader(load_manifest(demo_shards), 8, crop_size=48, workers=1, seed=0, pin_memory=True)
    images, labels = first_batch(loader, "cuda", torch.bfloat16)
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)


# Run through a small Python parent: a child's peak RSS as the kernel counts it includes the memory of the process it
# was forked from (kept across exec), and pytest's own is gigabytes.
PEAK_RSS = """import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = 0  # reaped above
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_with_peak_rss(argv, folder, cwd=None):
    """subprocess.run, with the child's peak resident set in KiB as wait4 reports it to its parent."""
    peak = folder / "peak_kib"
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(peak), *argv], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    return done, int(peak.read_text())


@pytest.mark.slow
def test_quick_run_writes_every_mode_and_a_plot(demo_shards, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [
        sys.executable,
        str(ROOT / "tools" / "bench_io.py"),
        "--shards",
        str(demo_shards),
        "--quick",
        "--batch-size",
        "32",
        "--crop-size",
        "64",  # the CPU preset, on a GPU as well
        "--tower-convs",
        "dense",
        "split",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
    ]
    run, peak_kib = run_with_peak_rss(argv, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out_json.read_text())
    for mode in MODES:
        r = report[mode]
        assert 0 < r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"], mode
        assert r["windows"] == 3 and r["images_per_window"] == 32 * 2 and r["cpu"]["cores_used"] > 0, mode
        assert r["img_per_s_per_core"] == pytest.approx(r["img_per_s"] / r["cpu"]["cores_used"]), mode
    assert report["towers"]["dense"] == report["model"] and report["towers"]["split"]["img_per_s"] > 0
    assert "model alone, split towers" in run.stdout
    boundary = report["loader"]["epoch_boundary"]
    assert boundary["stall_steps"] > 0 and boundary["steps"] >= 4 and "epoch boundary (loader alone)" in run.stdout
    # Between two counts the kernel keeps, read by the parent: a process that only imports what bench_io imports
    # (a floor), and bench_io's own peak with its workers' (a ceiling). A figure in bytes or MiB, or another
    # process's, falls outside.
    _, floor_kib = run_with_peak_rss([sys.executable, "-c", "import tools.bench_io"], tmp_path, cwd=ROOT)
    assert floor_kib / 2**20 < report["memory"]["host_rss_gib"] <= peak_kib / 2**20
    assert "peak memory after end to end" in run.stdout and not report["memory"]["after_sweep"]
    assert ("gpu_used_gib" in report["memory"]) == torch.cuda.is_available()
    assert 0 <= report["e2e"]["data_wait_frac"] <= 1
    assert ("gpu_busy_frac" in report["e2e"]) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert 0 < report["e2e"]["gpu_busy_frac"] <= 1 and report["machine"]["gpu"]
    rate = {m: report[m]["img_per_s"] for m in MODES}
    assert report["overlap"] == pytest.approx(rate["e2e"] / min(rate["loader"], rate["model"]))
    assert report["speedup_vs_baseline"] == pytest.approx(rate["e2e"] / rate["baseline"])
    assert f"overlap = end to end / min(loader, model) = {report['overlap']:.2f}" in run.stdout
    assert report["machine"]["cores_logical"] >= 1 and report["machine"]["torch"] == torch.__version__
    assert report["data"]["train_images"] == sum(
        s["count"] for s in json.loads((demo_shards / "manifest.json").read_text())["splits"]["train"]["shards"]
    )
    assert "overlap" in run.stdout and "baseline" in run.stdout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_shards_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert bench_io.main(["--shards", str(missing), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "shard_imagenet.py" in err


def test_usage_errors_are_one_line_and_exit_2(demo_shards, tmp_path, capsys):
    for argv in (
        ["--batch-size", "0"],
        ["--hw-decoder-load", "1.5"],
        ["--json", str(tmp_path / "no" / "x.json")],
        ["--threads", "many"],
        ["--tower-convs", "dense", "sparse"],
    ):
        with pytest.raises(SystemExit) as e:
            bench_io.parse_args(["--shards", str(demo_shards), *argv])
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1, argv


def test_a_training_run_s_config_sets_the_loader_and_flags_win(demo_shards, tmp_path, capsys):
    saved = {
        "shards": str(demo_shards),
        "batch_size": 8,
        "threads": 1,
        "hw_decoder_load": 0.3,
        "prefetch": 3,
        "divide_std": True,
        "lr": 0.1,
        "epochs": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = bench_io.parse_args(["--config", str(tmp_path / "config.json"), "--prefetch", "1"])
    assert (cfg.shards, cfg.batch_size, cfg.threads, cfg.hw_decoder_load, cfg.prefetch, cfg.divide_std) == (
        str(demo_shards),
        8,
        1,
        0.3,
        1,
        True,
    )
    assert "left out: epochs, lr" in capsys.readouterr().out


def test_quick_preset_and_explicit_flags(demo_shards):
    quick = bench_io.parse_args(["--shards", str(demo_shards), "--quick", "--device", "cpu"])
    assert (quick.batch_size, quick.crop_size, quick.steps, quick.windows, quick.warmup) == (32, 64, 2, 3, 1)
    assert quick.amp == "off"  # run.py's rule: bf16 autocast on a GPU only
    given = bench_io.parse_args(
        [
            "--shards",
            str(demo_shards),
            "--quick",
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--steps",
            "5",
            "--warmup",
            "0",
        ]
    )
    assert (given.batch_size, given.crop_size, given.steps, given.warmup) == (8, 64, 5, 0)
    full = bench_io.parse_args(["--shards", str(demo_shards), "--device", "cpu"])
    assert (full.batch_size, full.crop_size, full.steps, full.windows) == (128, 224, 20, 5)


def test_divide_std_is_off_by_default_as_in_run_py(demo_shards):
    assert not bench_io.parse_args(["--shards", str(demo_shards)]).divide_std
    assert bench_io.parse_args(["--shards", str(demo_shards), "--divide-std"]).divide_std
