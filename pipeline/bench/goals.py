"""The project's goals on one GPU, filled from bench_io's JSON (and a sweep's): whatever figures it holds, the rest
'not measured'.

    python -m pipeline.bench.goals bench.json [sweep.json]
"""

from __future__ import annotations

import json
import sys

from pipeline.bench.report import CPU_NOTE, _pct, _rate

GB = 1e9  # the goals are in GB; bench_io's figures in GiB
BASELINE = "baseline: torch DataLoader + webdataset + Pillow workers on the same 256x256 shards, same augmentation"


def _mark(r: dict) -> str:
    return f" [{r['indicative']}]" if r.get("indicative") else ""


def rows(bench: dict) -> list[tuple[str, str | None, str, bool | None]]:
    """(figure, measured or None, goal, met or None) for each goal."""
    rate = {m: bench[m]["img_per_s"] for m in ("loader", "model", "e2e") if m in bench}
    out = []
    if "model" in rate:
        towers = ", ".join(f"{t} {_rate(r['img_per_s'])}" for t, r in bench.get("towers", {}).items())
        measured = _rate(rate["model"]) + (f" ({towers})" if towers else "") + _mark(bench["model"])
        out.append(("model alone", measured, "≥ 25,000 img/s", rate["model"] >= 25_000))
    else:
        out.append(("model alone", None, "≥ 25,000 img/s", None))
    if "loader" in rate:
        out.append(
            ("loader alone", _rate(rate["loader"]) + _mark(bench["loader"]), "≥ 35,000 img/s", rate["loader"] >= 35_000)
        )
    else:
        out.append(("loader alone", None, "≥ 35,000 img/s", None))
    if "overlap" in bench:
        measured = f"{_rate(rate['e2e'])} = {bench['overlap']:.0%} of the lesser" + _mark(bench["e2e"])
        out.append(
            ("end to end", measured, "≥ 90 % and ≥ 22,000 img/s", bench["overlap"] >= 0.9 and rate["e2e"] >= 22_000)
        )
    else:
        out.append(("end to end", None, "≥ 90 % and ≥ 22,000 img/s", None))
    goal = "≥ 3.5x, equal cores"
    if "speedup_vs_baseline" in bench:
        x = bench["speedup_vs_baseline"]
        workers, threads = bench["baseline_e2e"]["workers"], bench["setting"]["threads"]
        measured = f"{x:.1f}x end to end, {workers} workers vs {threads} DALI threads" + _mark(bench["baseline_e2e"])
        out.append(("vs like-for-like baseline", measured, goal, x >= 3.5 and workers >= threads))
    else:
        out.append(("vs like-for-like baseline", None, goal, None))
    if "loader" in bench:
        stall = bench["loader"]["epoch_boundary"]["stall_steps"]
        out.append(("epoch boundary", f"{stall:.1f} steps", "≤ 2 steps", stall <= 2))
    else:
        out.append(("epoch boundary", None, "≤ 2 steps", None))
    if "memory" in bench:
        mem = bench["memory"]
        gpu_gb = mem["gpu_used_gib"] * 2**30 / GB if "gpu_used_gib" in mem else None
        host_gb = mem["host_rss_gib"] * 2**30 / GB
        measured = ("" if gpu_gb is None else f"{gpu_gb:.1f} GB GPU, ") + f"{host_gb:.1f} GB host (training part)"
        out.append(("peak memory", measured, "≤ 8 GB GPU, ≤ 4 GB host", (gpu_gb or 0) <= 8 and host_gb <= 4))
    else:
        out.append(("peak memory", None, "≤ 8 GB GPU, ≤ 4 GB host", None))
    return out


def goals(bench: dict, sweep: dict | None = None) -> str:
    """The goal table, the baseline's definition under it, and each sweep trial measured."""
    lines = [f"{'figure':<26} {'measured':<66} {'goal':<26} met"]
    for figure, measured, goal, met in rows(bench):
        ok = "-" if met is None else "yes" if met else "NO"
        lines.append(f"{figure:<26} {measured or 'not measured (cut off)':<66} {goal:<26} {ok}")
    lines.append(BASELINE)
    if any(bench.get(m, {}).get("indicative") for m in ("loader", "model", "e2e", "baseline_e2e")):
        lines.append("[...]: figures from windows too short to mean much")
    if not bench.get("machine", {}).get("gpu"):
        lines.append(CPU_NOTE)
    for t in (sweep or {}).get("sweep", {}).get("trials", []):
        lines.append(
            f"sweep: hw_decoder_load {t['hw_decoder_load']:<4} threads {t['threads']:<3} batch {t['batch_size']:<4} "
            f"stream {t.get('stream', 'default'):<9} loader {_rate(t['loader_img_per_s']):>8} img/s, end to end "
            f"{_rate(t['img_per_s']):>8} img/s, data wait {_pct(t['data_wait_frac'])}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print("usage: python -m pipeline.bench.goals bench.json [sweep.json]", file=sys.stderr)
        return 2
    try:
        bench, *sweep = (json.loads(open(p).read()) for p in argv)
    except (OSError, ValueError) as e:
        print(f"goals: cannot read {e}", file=sys.stderr)
        return 2
    print(goals(bench, sweep[0] if sweep else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
