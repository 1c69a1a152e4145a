"""A run's metrics: WORKDIR/metrics.jsonl, one line per epoch, and metrics.png, its curves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipeline.atomic import atomic_write


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(rows: list[dict], out: Path, title: str = "") -> Path:
    """Three panels side by side, one point per epoch; written atomically to `out`."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_err, ax_speed) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    ax_err.plot(epochs, [100 * r["val_top1_err"] for r in rows], "o-", label="top-1")
    ax_err.plot(epochs, [100 * r["val_top5_err"] for r in rows], "s-", label="top-5")
    ax_err.set(title="validation error (centre crop)", xlabel="epoch", ylabel="error %", ylim=(0, 100))
    ax_err.legend()
    ax_speed.plot(epochs, [r["img_per_s"] for r in rows], "o-", label="img/s")
    ax_speed.set(title="training throughput", xlabel="epoch", ylabel="images / s", ylim=(0, None))
    wait = ax_speed.twinx()
    wait.plot(epochs, [100 * r["data_wait_frac"] for r in rows], "x--", color="tab:red", label="data wait")
    wait.set(ylabel="data wait % of step time", ylim=(0, 100))
    ax_speed.legend(ax_speed.get_lines() + wait.get_lines(), ["img/s", "data wait %"], loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(out), buf.getvalue())
    return Path(out)


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """WORKDIR/metrics.jsonl (one line per epoch) and metrics.png, rewritten whole so a resume drops stale epochs."""
    atomic_write(Path(workdir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    if history:
        plot(history, Path(workdir) / "metrics.png", title=str(workdir))
