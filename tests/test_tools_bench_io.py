"""tools/bench_io.py: the derived ratios, the window timer, the sweep search, the baseline's augmentation against
NumPy, a --quick run on the demo shards with every mode in its JSON, a PNG and a trace, a run cut off keeping what it
measured, and bad values refused in one line before anything runs."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line
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
        "loader": {"img_per_s": 30000.0, "img_per_s_per_core": 3000.0},
        "model": {"img_per_s": 25000.0},
        "e2e": {"img_per_s": 22500.0},
        "baseline": {"img_per_s": 2500.0, "img_per_s_per_core": 150.0},
        "baseline_e2e": {"img_per_s": 2250.0},
    }
    want = {
        "overlap": 0.9,
        "speedup_vs_baseline": 10.0,
        "loader_vs_baseline": 12.0,
        "loader_vs_baseline_per_core": 20.0,
    }
    assert derive(results) == pytest.approx(want)
    # End to end is compared with the baseline's end to end, never with a loader; a ratio whose figures are not
    # there (a run cut off) is left out.
    assert derive({k: results[k] for k in ("loader", "model", "e2e", "baseline")}) == pytest.approx(
        {"overlap": 0.9, "loader_vs_baseline": 12.0, "loader_vs_baseline_per_core": 20.0}
    )


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


def test_clock_times_the_device_without_a_host_sync(device):
    """A window of device work is timed in full, and no longer than the wall clock around it: on a GPU queued work
    that the host never waited for (sync debug mode raises on a sync), on the CPU the host's own."""
    clock = Clock(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    start = time.perf_counter()
    try:
        marks = [clock.mark()]
        if device == "cuda":
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time at 2 GHz
        else:
            time.sleep(0.1)
        marks.append(clock.mark())
        queued = time.perf_counter() - start
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    (window,) = clock.seconds(marks)
    if device == "cuda":
        torch.cuda.synchronize()
        assert queued < window  # the host returned before the GPU was done
    else:
        assert 0.1 <= window <= queued
    assert window <= time.perf_counter() - start < 1.1  # within the wall clock around it


def test_parse_values_reads_a_grid_and_rejects_bad_knobs():
    assert parse_values("hw_decoder_load=1,0.65,0") == ("hw_decoder_load", [1.0, 0.65, 0.0])
    assert parse_values("threads=16") == ("threads", [16])
    for bad in ("threads=many", "lr=0.1", "threads="):
        with pytest.raises(ValueError, match=r"threads|KNOB"):
            parse_values(bad)


def test_sweep_values_set_the_grid_and_imply_sweep(demo_shards, capsys):
    cfg = bench_io.parse_args(
        ["--shards", str(demo_shards), "--sweep-values", "hw_decoder_load=1,0.65,0", "threads=16", "stream=default"]
    )
    grid = dict(map(parse_values, cfg.sweep_values))
    assert cfg.sweep and grid == {"hw_decoder_load": [1.0, 0.65, 0.0], "threads": [16], "stream": ["default"]}
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
    grid = sweep_grid(start, cores=16, cuda=True, max_batch=1000)
    grid.pop("stream")
    best, trials = coordinate_search(grid, start, measure)
    assert best == peak
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls}) == len(trials)
    assert len(calls) == 1 + sum(len(v) for v in grid.values()) - len(grid)  # the start point is measured once


def test_sweep_grid():
    start = {"batch_size": 64, "threads": 3, "hw_decoder_load": 0.65, "prefetch": 2}
    cpu = sweep_grid(start, cores=2, cuda=False, max_batch=96)
    assert cpu == {
        "batch_size": [32, 64],  # not 128: more than the split's 96 images
        "threads": [1, 2, 3],
        "hw_decoder_load": [0.65],
        "prefetch": [1, 2, 3, 4],
    }
    gpu = sweep_grid(start, cores=16, cuda=True, max_batch=1000)
    assert gpu["threads"] == [1, 2, 3, 4, 8, 16] and gpu["hw_decoder_load"] == [0.0, 0.5, 0.65, 0.8, 1.0]
    assert gpu["batch_size"] == [32, 64, 128] and gpu["stream"] == ["default", "dedicated"]


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


def test_baseline_batches_land_on_the_device_as_the_cpu_makes_them(demo_shards, device):
    """The same seed's batch on `device` in bf16 is the CPU's float32 batch, rounded."""
    manifest = load_manifest(demo_shards)
    loader = baseline_loader(manifest, 8, crop_size=48, workers=1, seed=0, pin_memory=device == "cuda")
    images, labels = first_batch(loader, device, torch.bfloat16)
    assert images.device.type == labels.device.type == device and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    cpu = baseline_loader(manifest, 8, crop_size=48, workers=1, seed=0)
    cpu_images, cpu_labels = first_batch(cpu, "cpu", torch.float32)
    assert torch.equal(labels.cpu(), cpu_labels) and torch.equal(images.cpu(), cpu_images.to(torch.bfloat16))


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
def test_quick_run_writes_every_mode_a_plot_and_a_trace(demo_shards, tmp_path):
    out_json, out_png, out_trace = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "trace.json"
    argv = [
        sys.executable,
        str(ROOT / "tools" / "bench_io.py"),
        "--shards",
        str(demo_shards),
        "--quick",
        "--batch-size",
        "16",  # half the CPU preset: the test times seven kinds of steps
        "--crop-size",
        "64",  # the CPU preset, on a GPU as well
        "--tower-convs",
        "dense",
        "split",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--trace",
        str(out_trace),
    ]
    run, peak_kib = run_with_peak_rss(argv, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out_json.read_text())
    for mode in MODES:
        r = report[mode]
        assert 0 < r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"], mode
        assert r["windows"] == 3 and r["images_per_window"] == 16 * 2 and r["cpu"]["cores_used"] > 0, mode
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
    assert "peak memory of the training part" in run.stdout and not report["memory"]["after_sweep"]
    assert ("gpu_used_gib" in report["memory"]) == torch.cuda.is_available()
    assert 0 <= report["e2e"]["data_wait_frac"] <= 1
    assert ("gpu_busy_frac" in report["e2e"]) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert 0 < report["e2e"]["gpu_busy_frac"] <= 1 and report["machine"]["gpu"]
    rate = {m: report[m]["img_per_s"] for m in MODES}
    assert report["overlap"] == pytest.approx(rate["e2e"] / min(rate["loader"], rate["model"]))
    assert report["speedup_vs_baseline"] == pytest.approx(rate["e2e"] / rate["baseline_e2e"])  # like for like
    assert report["loader_vs_baseline"] == pytest.approx(rate["loader"] / rate["baseline"])
    assert report["baseline"]["workers"] == report["setting"]["threads"]  # equal cores unless told otherwise
    assert "end to end vs baseline end to end (the same step)" in run.stdout and "CPU figures say nothing" in run.stdout
    # Each figure printed as measured, before the table; windows of milliseconds flagged as such.
    assert run.stdout.index("loader alone (DALI): ") < run.stdout.index("mode ")
    assert report["loader"]["indicative"] == "windows under 0.1 s" and "* windows under 0.1 s" in run.stdout
    # The trace opens as Chrome/Perfetto JSON and holds the named ranges, each once per traced step.
    events = json.loads(out_trace.read_text())["traceEvents"]
    named = Counter(e.get("name") for e in events)
    assert named["data wait"] == named["training step"] == bench_io.TRACE_STEPS and named["DALI run"] >= 1
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


def test_usage_errors_are_one_line_and_exit_2(demo_shards, tmp_path, capsys, deny):
    (tmp_path / "locked").mkdir()
    deny(tmp_path / "locked")
    for argv, says in (
        (["--batch-size", "0"], "--batch-size"),
        (["--hw-decoder-load", "1.5"], "--hw-decoder-load"),
        (["--crop-size", "32"], "--crop-size 32: must be at least 63"),  # AlexNet's poolings leave no pixel
        (["--json", str(tmp_path / "no" / "x.json")], "--json"),
        (["--json", ""], "--json"),  # would otherwise write nothing, silently
        (["--json", str(tmp_path)], "--json"),  # a folder
        (["--plot", str(tmp_path / "locked" / "b.png")], "cannot write"),
        (["--trace", str(tmp_path / "locked" / "t.json")], "cannot write"),
        (["--threads", "many"], "--threads"),
        (["--tower-convs", "dense", "sparse"], "--tower-convs"),
        (["--sweep-values", "batch_size=0,-1"], "batch_size=0: must be at least 1"),
        (["--sweep-values", "hw_decoder_load=2"], "hw_decoder_load=2.0"),
        (["--sweep-values", "stream=fast"], "stream"),
        (["--device", "cpu", "--sweep-values", "stream=default,dedicated"], "needs a GPU"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_io.parse_args(["--shards", str(demo_shards), *argv])
        assert e.value.code == 2
        one_line(capsys.readouterr().err, says)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batch-size", "100000"], "more than the 96 training images"),
        (["--sweep-values", "batch_size=8,97"], "--batch-size 97: more than the 96"),
        (["--batch-size", "96", "--crop-size", "20000"], "GiB of batches in flight"),
    ],
)
def test_batch_sizes_beyond_the_data_or_the_memory_are_refused_before_anything_runs(
    demo_shards, tmp_path, capsys, argv, says
):
    out = tmp_path / "bench.json"
    assert bench_io.main(["--shards", str(demo_shards), "--device", "cpu", "--json", str(out), *argv]) == 2
    one_line(capsys.readouterr().err, says)
    assert not out.exists()  # refused before the first figure


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


@pytest.mark.slow
def test_a_run_cut_off_keeps_every_figure_measured_and_prints_them(demo_shards, tmp_path):
    """SIGTERM (a time cap) once the first figures are in the JSON: they stay there, whole, and the table printed at
    the end shows them with the rest 'not measured'; the goal table is made from the same file."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(ROOT / "tools" / "bench_io.py"), "--shards", str(demo_shards), "--device", "cpu"]
    argv += ["--quick", "--batch-size", "8", "--json", str(out), "--tower-convs", "dense", "grouped", "split"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and "model" in json.loads(out.read_text()):  # atomic: never a half-written file
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"loader", "model"} <= report.keys() and "baseline_e2e" not in report
    assert "loader alone (DALI): " in stdout and "baseline end to end" in stdout and "not measured" in stdout
    goals = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.goals", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert goals.returncode == 0 and "model alone" in goals.stdout and "not measured (cut off)" in goals.stdout


def test_the_tables_are_made_from_whatever_figures_are_there():
    """A report cut off after the loader: its figure and boundary are shown, every other row says so, no ratio is
    made up from figures that are not there."""
    from pipeline.bench.goals import goals
    from pipeline.bench.report import table

    loader = {
        **summarise([0.5, 0.5, 0.5], images_per_window=20_000),
        "img_per_s_per_core": 10_000.0,
        "cpu": {"cores_used": 4.0},
        "epoch_boundary": {"longest_s": 0.02, "median_step_s": 0.01, "stall_steps": 2.0},
    }
    report = {"machine": {"gpu": "H100", "cpu": "x"}, "setting": {"threads": 8}, "loader": loader}
    shown = table(report)
    assert shown.splitlines()[1].split()[:4] == ["loader", "alone", "(DALI)", "40,000"]
    assert shown.count("not measured") == 4
    assert "overlap" not in shown and "vs baseline" not in shown and "CPU figures" not in shown
    rows = {line.split("  ")[0]: line for line in goals(report).splitlines()}
    assert "40,000" in rows["loader alone"] and rows["loader alone"].endswith("yes")
    assert rows["epoch boundary"].endswith("yes")
    for figure in ("model alone", "end to end", "vs like-for-like baseline", "peak memory"):
        assert "not measured (cut off)" in rows[figure] and rows[figure].endswith("-")
