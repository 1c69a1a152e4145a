"""bench_io's results: the derived ratios, the stdout table, the JSON file and the PNG bar chart."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.atomic import atomic_write

MODES = ("loader", "model", "e2e", "baseline")
LABELS = {
    "loader": "loader alone (DALI)",
    "model": "model alone (train step)",
    "e2e": "end to end",
    "baseline": "baseline (DataLoader+Pillow)",
}


def overlap(e2e: float, loader: float, model: float) -> float:
    """End to end over the lower ceiling: 1.0 when input and compute overlap perfectly."""
    return e2e / min(loader, model)


def speedup(ours: float, baseline: float) -> float:
    return ours / baseline


def derive(results: dict) -> dict:
    """The ratios the issue asks for, from the four modes' median images/s."""
    rate = {m: results[m]["img_per_s"] for m in MODES}
    return {
        "overlap": overlap(rate["e2e"], rate["loader"], rate["model"]),
        "speedup_vs_baseline": speedup(rate["e2e"], rate["baseline"]),
        "loader_vs_baseline": speedup(rate["loader"], rate["baseline"]),
    }


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def table(report: dict) -> str:
    """The modes as rows (median img/s, spread, CPU) and the derived ratios under them."""
    rows = [
        f"{'mode':<30} {'img/s':>9} {'min - max':>17} {'cores used':>10} {'img/s/core':>10} {'data wait':>9} "
        f"{'GPU busy':>8}"
    ]
    for m in MODES:
        r = report[m]
        spread = f"{_rate(r['img_per_s_min'])} - {_rate(r['img_per_s_max'])}"
        rows.append(
            f"{LABELS[m]:<30} {_rate(r['img_per_s']):>9} {spread:>17} {r['cpu']['cores_used']:>10.2f} "
            f"{_rate(r['img_per_s_per_core']):>10} "
            f"{_pct(r.get('data_wait_frac')):>9} {_pct(r.get('gpu_busy_frac')):>8}"
        )
    for convs, r in report.get("towers", {}).items():
        rows.append(f"{'  model alone, ' + convs + ' towers':<30} {_rate(r['img_per_s']):>9}")
    b = report["loader"]["epoch_boundary"]
    rows.append(
        f"epoch boundary (loader alone): longest step {1e3 * b['longest_s']:,.1f} ms = "
        f"{b['stall_steps']:.1f} median steps of {1e3 * b['median_step_s']:,.1f} ms"
    )
    mem = report["memory"]
    gpu = (
        f"GPU {mem['gpu_used_gib']:.1f} GiB in use (torch's pool at most {mem['gpu_torch_gib']:.1f}, DALI and CUDA "
        f"{mem['gpu_other_gib']:.1f}), "
        if "gpu_used_gib" in mem
        else ""
    )
    sweep = (
        " (after --sweep: GPU pools released first, the host peak includes the trials)"
        if mem.get("after_sweep")
        else ""
    )
    rows.append(f"peak memory after end to end: {gpu}host RSS {mem['host_rss_gib']:.2f} GiB{sweep}")
    rows.append(f"overlap = end to end / min(loader, model) = {report['overlap']:.2f}")
    rows.append(
        f"end to end vs baseline = {report['speedup_vs_baseline']:.2f}x   "
        f"(loader vs baseline = {report['loader_vs_baseline']:.2f}x)"
    )
    return "\n".join(rows)


def write_json(path: Path, report: dict) -> None:
    atomic_write(path, (json.dumps(report, indent=2) + "\n").encode())


def write_plot(path: Path, report: dict) -> None:
    """A bar per mode (median img/s, whiskers min to max), titled with the machine and the batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [report[m]["img_per_s"] for m in MODES]
    low = [r - report[m]["img_per_s_min"] for r, m in zip(rates, MODES)]
    high = [report[m]["img_per_s_max"] - r for r, m in zip(rates, MODES)]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(
        [LABELS[m].replace(" (", "\n(") for m in MODES],
        rates,
        yerr=[low, high],
        capsize=4,
        color=["#4c72b0", "#55a868", "#c44e52", "#8c8c8c"],
    )
    ax.bar_label(bars, labels=[_rate(r) for r in rates], padding=3)
    log = max(rates) > 10 * min(rates)  # a CPU-bound model next to the loaders: keep every bar readable
    if log:
        ax.set_yscale("log")
    machine = report["machine"]
    ax.set_title(
        f"{machine['gpu'] or machine['cpu']} - batch {report['setting']['batch_size']}, "
        f"crop {report['config']['crop_size']}\n"
        f"overlap {report['overlap']:.2f}, end to end {report['speedup_vs_baseline']:.2f}x baseline",
        fontsize=9,
    )
    ax.set_ylabel("images / s (median of windows" + (", log scale)" if log else ")"))
    ax.margins(y=0.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


GB = 1e9  # the goals are in GB; bench_io's figures in GiB


def goals(bench: dict, sweep: dict | None = None) -> str:
    """Issue 14's goal table filled from a bench_io JSON (and the sweep's trials when there is one)."""
    rate = {m: bench[m]["img_per_s"] for m in MODES}
    mem, stall = bench["memory"], bench["loader"]["epoch_boundary"]["stall_steps"]
    gpu_gb = mem["gpu_used_gib"] * 2**30 / GB if "gpu_used_gib" in mem else None
    host_gb = mem["host_rss_gib"] * 2**30 / GB
    towers = ", ".join(f"{t} {_rate(r['img_per_s'])}" for t, r in bench.get("towers", {}).items())
    rows = [
        (
            "model alone",
            _rate(rate["model"]) + (f" ({towers})" if towers else ""),
            "≥ 25,000 img/s",
            rate["model"] >= 25_000,
        ),
        ("loader alone", _rate(rate["loader"]), "≥ 35,000 img/s", rate["loader"] >= 35_000),
        (
            "end to end",
            f"{_rate(rate['e2e'])} = {bench['overlap']:.0%} of the lesser",
            "≥ 90 % and ≥ 22,000 img/s",
            bench["overlap"] >= 0.9 and rate["e2e"] >= 22_000,
        ),
        ("vs DataLoader + Pillow", f"{bench['speedup_vs_baseline']:.1f}x", "≥ 8x", bench["speedup_vs_baseline"] >= 8),
        ("epoch boundary", f"{stall:.1f} steps", "≤ 2 steps", stall <= 2),
        (
            "peak memory",
            ("" if gpu_gb is None else f"{gpu_gb:.1f} GB GPU, ") + f"{host_gb:.1f} GB host",
            "≤ 8 GB GPU, ≤ 4 GB host",
            (gpu_gb or 0) <= 8 and host_gb <= 4,
        ),
    ]
    lines = [f"{'figure':<24} {'measured':<44} {'goal':<26} met"]
    lines += [f"{f:<24} {m:<44} {g:<26} {'yes' if ok else 'NO'}" for f, m, g, ok in rows]
    for t in (sweep or {}).get("sweep", {}).get("trials", []):
        lines.append(
            f"sweep: hw_decoder_load {t['hw_decoder_load']:<4} threads {t['threads']:<3} batch "
            f"{t['batch_size']:<4} loader {_rate(t['loader_img_per_s']):>8} img/s, end to end "
            f"{_rate(t['img_per_s']):>8} img/s, data wait {_pct(t['data_wait_frac'])}"
        )
    return "\n".join(lines)
