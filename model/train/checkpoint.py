"""Checkpoints: atomic writes with a checksum footer, keep the last K and the best, load the latest good one;
the training state and every rank's RNG states that a resume restores."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import torch
import torch.distributed

from pipeline.atomic import atomic_write, fsync_dir

MAGIC = b"ALEXNET-CKPT-v1\n"  # footer: MAGIC + sha256 of the payload + payload length (8 bytes, little endian)
FOOTER = len(MAGIC) + 32 + 8
NAME = re.compile(r"^step-(\d{9})\.pt$")
BEST = "best.pt"


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message is one line naming the file."""


def encode(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return payload + MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little")


def read(path: Path, map_location="cpu") -> dict:
    """Load one checkpoint, raising CheckpointError if it is truncated or its bytes do not match the checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(
            f"{path}: unreadable ({e.strerror}); name a file in a run's WORKDIR/checkpoints"
        ) from None
    if len(data) < FOOTER or data[-FOOTER:-40] != MAGIC:
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({len(data)} bytes, no footer)")
    payload, digest, size = data[:-FOOTER], data[-40:-8], int.from_bytes(data[-8:], "little")
    if len(payload) != size or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: corrupt (checksum mismatch)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def step_files(folder: Path) -> list[Path]:
    """The step checkpoints in `folder`, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.match(p.name)), key=lambda p: p.name, reverse=True)


def is_finite(model: torch.nn.Module, device) -> bool:
    """Whether every weight is finite (one host sync): weights that are not are never saved."""
    return bool(torch.stack([p.detach().float().sum().to(device) for p in model.parameters()]).sum().isfinite())


def path_for(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


def save(folder: Path, state: dict, step: int, keep: int = 3, best: bool = False) -> Path:
    """Write step-NNNNNNNNN.pt atomically, refresh best.pt if `best`, delete step files beyond the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = encode(state)
    path = path_for(folder, step)
    atomic_write(path, data)
    if best:  # a hard link: step files are never rewritten, so best.pt costs no second copy
        tmp = folder / f".{BEST}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, folder / BEST)
        fsync_dir(folder)
    for old in step_files(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path, map_location="cpu", warn=print) -> tuple[dict, Path] | None:
    """The newest readable step checkpoint; each unreadable one is reported through `warn` and skipped."""
    files = step_files(folder)
    for i, path in enumerate(files):
        try:
            return read(path, map_location), path
        except CheckpointError as e:
            fallback = f"falling back to {files[i + 1].name}" if i + 1 < len(files) else "no older checkpoint left"
            warn(f"warning: {e}; {fallback}")
    return None


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler) -> dict:
    """The weights and the optimiser's (and fp16 loss scaler's) state, as restore_training() takes them back."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def restore_training(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])


def rng_state() -> dict:
    """This process's torch RNG states (CPU and every CUDA device): dropout draws continue exactly on resume."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def every_rank(obj, world_size: int) -> list:
    """Every rank's `obj`, gathered (a collective under torchrun) so that rank 0's checkpoint holds them all."""
    every = [obj] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(every, obj)
    return every


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
