"""bench_io --sweep: which batch size, DALI threads, hw_decoder_load and prefetch depth feed the step fastest."""

from __future__ import annotations

import typing
from collections.abc import Callable

from pipeline.settings import LoaderSettings

SWEPT = ("batch_size", "threads", "hw_decoder_load", "prefetch")
KINDS = {name: kind for name, kind in typing.get_type_hints(LoaderSettings).items() if name in SWEPT}


def parse_values(spec: str) -> tuple[str, list]:
    """ "hw_decoder_load=1,0.65,0" -> ("hw_decoder_load", [1.0, 0.65, 0.0]): one knob's values for a chosen grid."""
    name, _, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if name not in KINDS or not values:
        raise ValueError(f"{spec!r}: write KNOB=V[,V...] with KNOB one of {', '.join(SWEPT)}")
    try:
        return name, [KINDS[name](v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"{spec!r}: {name} takes {KINDS[name].__name__} values") from None


def sweep_grid(start: dict, cores: int, cuda: bool) -> dict[str, list]:
    """Values tried per knob around the `start` setting; hw_decoder_load only matters where DALI decodes on a GPU."""
    batch, hw = start["batch_size"], start["hw_decoder_load"]
    return {
        "batch_size": sorted({max(1, batch // 2), batch, 2 * batch}),
        "threads": sorted({t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores} | {start["threads"]}),
        "hw_decoder_load": sorted({0.0, 0.5, 0.65, 0.8, 1.0, hw}) if cuda else [hw],
        "prefetch": sorted({1, 2, 3, 4, start["prefetch"]}),
    }


def coordinate_search(grid: dict[str, list], start: dict, measure: Callable[[dict], dict]) -> tuple[dict, list]:
    """One knob at a time, each at its best value so far; returns the best setting and every trial."""
    trials, seen = [], {}

    def score(setting: dict) -> float:
        key = tuple(sorted(setting.items()))
        if key not in seen:
            seen[key] = measure(setting)
            trials.append({**setting, **seen[key]})
        return seen[key]["img_per_s"]

    best = dict(start)
    best_rate = score(best)
    for name, values in grid.items():
        for value in values:
            candidate = {**best, name: value}
            if (rate := score(candidate)) > best_rate:
                best, best_rate = candidate, rate
    return best, trials


HEADER = (
    f"{'batch':>6} {'threads':>7} {'hw load':>7} {'prefetch':>8} {'loader img/s':>12} {'e2e img/s':>10} "
    f"{'data wait':>9}"
)


def trial_row(t: dict) -> str:
    return (
        f"{t['batch_size']:>6} {t['threads']:>7} {t['hw_decoder_load']:>7.2f} {t['prefetch']:>8} "
        f"{t['loader_img_per_s']:>12,.1f} {t['img_per_s']:>10,.1f} {100 * t['data_wait_frac']:>7.0f} %"
    )


def best_line(best: dict) -> str:
    return (
        f"best, as run.py flags: --batch-size {best['batch_size']} --threads {best['threads']} "
        f"--hw-decoder-load {best['hw_decoder_load']} --prefetch {best['prefetch']}"
    )
