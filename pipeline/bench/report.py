"""bench_io's results: the report saved and printed figure by figure, the derived ratios, the summary table, the
goal table and the PNG bar chart, each made from whatever figures the report holds."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.atomic import atomic_write

MODES = ("loader", "baseline", "model", "e2e", "baseline_e2e")
LABELS = {
    "loader": "loader alone (DALI)",
    "baseline": "baseline loader alone",
    "model": "model alone (train step)",
    "e2e": "end to end (DALI)",
    "baseline_e2e": "baseline end to end",
}
CPU_NOTE = "CPU figures say nothing about a GPU: there DALI decodes on the GPU and the step takes milliseconds"


class Record:
    """The report as it grows: each figure is written to the JSON (atomically, so a cut-off run leaves every figure
    measured before it) and printed as soon as it is measured."""

    def __init__(self, path: Path | None, report: dict):
        self.path, self.report = path, report
        self.save()

    def __setitem__(self, key: str, value) -> None:
        self.report[key] = value
        self.report.update(derive(self.report))
        self.save()
        if key in MODES:
            print(figure_line(key, value), flush=True)

    def __getitem__(self, key: str):
        return self.report[key]

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.report)


def overlap(e2e: float, loader: float, model: float) -> float:
    """End to end over the lower ceiling: 1.0 when input and compute overlap perfectly."""
    return e2e / min(loader, model)


def speedup(ours: float, baseline: float) -> float:
    return ours / baseline


def derive(results: dict) -> dict:
    """The ratios whose figures are there: overlap, and ours against the baseline like for like (end to end through
    the same step; loader against loader, absolute and per core of CPU used)."""
    rate = {m: results[m]["img_per_s"] for m in MODES if m in results}
    out = {}
    if {"e2e", "loader", "model"} <= rate.keys():
        out["overlap"] = overlap(rate["e2e"], rate["loader"], rate["model"])
    if {"e2e", "baseline_e2e"} <= rate.keys():
        out["speedup_vs_baseline"] = speedup(rate["e2e"], rate["baseline_e2e"])
    if {"loader", "baseline"} <= rate.keys():
        out["loader_vs_baseline"] = speedup(rate["loader"], rate["baseline"])
        per_core = [results[m]["img_per_s_per_core"] for m in ("loader", "baseline")]
        out["loader_vs_baseline_per_core"] = speedup(*per_core)
    return out


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def figure_line(mode: str, r: dict) -> str:
    """One measured figure, as printed the moment it is measured."""
    flag = f" [{r['indicative']}]" if r.get("indicative") else ""
    return (
        f"{LABELS[mode]}: {_rate(r['img_per_s'])} img/s ({_rate(r['img_per_s_min'])} - {_rate(r['img_per_s_max'])}), "
        f"{r['cpu']['cores_used']:.2f} cores used{flag}"
    )


def table(report: dict) -> str:
    """The modes as rows (median img/s, spread, CPU) and the derived ratios under them; a figure the run did not
    reach reads 'not measured'."""
    rows = [
        f"{'mode':<30} {'img/s':>9} {'min - max':>17} {'cores used':>10} {'img/s/core':>10} {'data wait':>9} "
        f"{'GPU busy':>8}"
    ]
    for m in MODES:
        if m not in report:
            rows.append(f"{LABELS[m]:<30} {'not measured':>12}")
            continue
        r = report[m]
        spread = f"{_rate(r['img_per_s_min'])} - {_rate(r['img_per_s_max'])}"
        rows.append(
            f"{LABELS[m]:<30} {_rate(r['img_per_s']):>9} {spread:>17} {r['cpu']['cores_used']:>10.2f} "
            f"{_rate(r['img_per_s_per_core']):>10} "
            f"{_pct(r.get('data_wait_frac')):>9} {_pct(r.get('gpu_busy_frac')):>8}"
            + (" *" if r.get("indicative") else "")
        )
    for convs, r in report.get("towers", {}).items():
        rows.append(f"{'  model alone, ' + convs + ' towers':<30} {_rate(r['img_per_s']):>9}")
    if any(report.get(m, {}).get("indicative") for m in MODES):
        rows.append(
            "* "
            + "; ".join(sorted({report[m]["indicative"] for m in MODES if report.get(m, {}).get("indicative")}))
            + ": indicative only, CPU use and ratios included"
        )
    if "loader" in report:
        b = report["loader"]["epoch_boundary"]
        rows.append(
            f"epoch boundary (loader alone): longest step {1e3 * b['longest_s']:,.1f} ms = "
            f"{b['stall_steps']:.1f} median steps of {1e3 * b['median_step_s']:,.1f} ms"
        )
    if "memory" in report:
        rows.append(
            "peak memory of the training part (DALI loader and step, before the baseline): " + _memory(report["memory"])
        )
    if "overlap" in report:
        rows.append(f"overlap = end to end / min(loader, model) = {report['overlap']:.2f}")
    if "speedup_vs_baseline" in report:
        rows.append(f"end to end vs baseline end to end (the same step) = {report['speedup_vs_baseline']:.2f}x")
    if "loader_vs_baseline" in report:
        rows.append(
            f"loader vs baseline loader = {report['loader_vs_baseline']:.2f}x, per core used "
            f"{report['loader_vs_baseline_per_core']:.2f}x ({_cores(report)})"
        )
    if not report.get("machine", {}).get("gpu"):
        rows.append(CPU_NOTE)
    return "\n".join(rows)


def _cores(report: dict) -> str:
    """DALI's threads against the baseline's worker processes: the cores each loader was given."""
    threads, workers = report["setting"]["threads"], report["baseline"]["workers"]
    return f"{threads} DALI threads vs {workers} workers" + ("" if threads == workers else ": unequal cores")


def _memory(mem: dict) -> str:
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
    return f"{gpu}host peak RSS {mem['host_rss_gib']:.2f} GiB{sweep}"


def write_json(path: Path, report: dict) -> None:
    atomic_write(path, (json.dumps(report, indent=2) + "\n").encode())


def write_plot(path: Path, report: dict) -> None:
    """A bar per measured mode (median img/s, whiskers min to max), titled with the machine and the batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in report]
    rates = [report[m]["img_per_s"] for m in modes]
    low = [r - report[m]["img_per_s_min"] for r, m in zip(rates, modes)]
    high = [report[m]["img_per_s_max"] - r for r, m in zip(rates, modes)]
    colours = {
        "loader": "#4c72b0",
        "baseline": "#8c8c8c",
        "model": "#55a868",
        "e2e": "#c44e52",
        "baseline_e2e": "#b0b0b0",
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(
        [LABELS[m].replace(" (", "\n(") for m in modes],
        rates,
        yerr=[low, high],
        capsize=4,
        color=[colours[m] for m in modes],
    )
    ax.bar_label(bars, labels=[_rate(r) for r in rates], padding=3)
    log = bool(rates) and max(rates) > 10 * min(rates)  # a CPU-bound model next to the loaders: keep every bar readable
    if log:
        ax.set_yscale("log")
    machine = report["machine"]
    ratios = []
    if "overlap" in report:
        ratios.append(f"overlap {report['overlap']:.2f}")
    if "speedup_vs_baseline" in report:
        ratios.append(f"end to end {report['speedup_vs_baseline']:.2f}x the baseline's")
    ax.set_title(
        f"{machine['gpu'] or machine['cpu']} - batch {report['setting']['batch_size']}, "
        f"crop {report['config']['crop_size']}\n" + ", ".join(ratios),
        fontsize=9,
    )
    ax.set_ylabel("images / s (median of windows" + (", log scale)" if log else ")"))
    ax.margins(y=0.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
