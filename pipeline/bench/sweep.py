"""bench_io --sweep: which batch size, DALI threads, hw_decoder_load and prefetch depth (and on a GPU, which stream)
feed the step fastest."""

from __future__ import annotations

import typing
from collections.abc import Callable

from pipeline.settings import LoaderSettings

SWEPT = ("batch_size", "threads", "hw_decoder_load", "prefetch")
# The stream the training step runs on: torch's legacy default one (as run.py trains), or a torch.cuda.Stream of its
# own, which the legacy stream's implicit synchronisation with every other blocking stream cannot hold up.
STREAMS = ("default", "dedicated")
KINDS = {name: kind for name, kind in typing.get_type_hints(LoaderSettings).items() if name in SWEPT} | {"stream": str}


def parse_values(spec: str) -> tuple[str, list]:
    """ "hw_decoder_load=1,0.65,0" -> ("hw_decoder_load", [1.0, 0.65, 0.0]): one knob's values for a chosen grid."""
    name, _, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if name not in KINDS or not values:
        raise ValueError(f"{spec!r}: write KNOB=V[,V...] with KNOB one of {', '.join(KINDS)}")
    try:
        parsed = [KINDS[name](v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"{spec!r}: {name} takes {KINDS[name].__name__} values") from None
    if name == "stream" and not set(parsed) <= set(STREAMS):
        raise ValueError(f"{spec!r}: stream is one of {', '.join(STREAMS)}")
    return name, parsed


def sweep_grid(start: dict, cores: int, cuda: bool, max_batch: int) -> dict[str, list]:
    """Values tried per knob around the `start` setting, batches up to `max_batch` (the split's images);
    hw_decoder_load and the stream only matter on a GPU."""
    batch, hw = start["batch_size"], start["hw_decoder_load"]
    grid = {
        "batch_size": sorted({b for b in (max(1, batch // 2), batch, 2 * batch) if b <= max_batch}),
        "threads": sorted({t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores} | {start["threads"]}),
        "hw_decoder_load": sorted({0.0, 0.5, 0.65, 0.8, 1.0, hw}) if cuda else [hw],
        "prefetch": sorted({1, 2, 3, 4, start["prefetch"]}),
    }
    return grid | ({"stream": list(STREAMS)} if cuda else {})


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
    f"{'batch':>6} {'threads':>7} {'hw load':>7} {'prefetch':>8} {'stream':>9} {'loader img/s':>12} "
    f"{'e2e img/s':>10} {'data wait':>9}"
)


def trial_row(t: dict) -> str:
    return (
        f"{t['batch_size']:>6} {t['threads']:>7} {t['hw_decoder_load']:>7.2f} {t['prefetch']:>8} "
        f"{t.get('stream', 'default'):>9} {t['loader_img_per_s']:>12,.1f} {t['img_per_s']:>10,.1f} "
        f"{100 * t['data_wait_frac']:>7.0f} %"
    )


def best_line(best: dict) -> str:
    stream = best.get("stream", "default")
    return (
        f"best, as run.py flags: --batch-size {best['batch_size']} --threads {best['threads']} "
        f"--hw-decoder-load {best['hw_decoder_load']} --prefetch {best['prefetch']}"
    ) + ("" if stream == "default" else " (faster with the step on a dedicated CUDA stream; run.py uses the default)")
