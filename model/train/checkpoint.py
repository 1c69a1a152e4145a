"""Checkpoints: atomic writes with a checksum footer, keep the last K and the best, load the latest good one;
what a resume restores: the training state, where the run stands (TrainState), every rank's RNG states, and the
pixel statistics the inputs were normalised with."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from pipeline.atomic import atomic_file, fsync_dir
from pipeline.manifest import Manifest

MAGIC = b"ALEXNET-CKPT-v1\n"  # footer: MAGIC + sha256 of the payload + payload length (8 bytes, little endian)
FOOTER = len(MAGIC) + 32 + 8
NAME = re.compile(r"^step-(\d{9})\.pt$")
BEST = "best.pt"
STATISTICS = ("rgb_mean", "rgb_std", "eigval", "eigvec")  # the inputs' normalisation and PCA lighting (§2, §4.1)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message is one line naming the file."""


class Hashing:
    """A file that hashes and counts the bytes written through it: torch.save streams into the checkpoint's file,
    with no copy of the model's state held in memory (two, with the footer appended to a buffer)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def footer(self) -> bytes:
        return MAGIC + self.sha.digest() + self.size.to_bytes(8, "little")


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
    digest, size = data[-40:-8], int.from_bytes(data[-8:], "little")
    payload = data[:-FOOTER]
    del data  # a copy less while the tensors are built
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
    path = path_for(folder, step)
    with atomic_file(path) as f:
        torch.save(state, hashing := Hashing(f))
        f.write(hashing.footer())
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


def statistics(manifest: Manifest) -> dict:
    """The pixel statistics the inputs are normalised and lit with, as a checkpoint keeps them."""
    return {k: np.asarray(getattr(manifest, k)).tolist() for k in STATISTICS}


def with_statistics(manifest: Manifest, saved: dict | None) -> Manifest:
    """`manifest` normalising with the statistics a checkpoint was trained with (None: an older one's, its own)."""
    if saved is None:
        return manifest
    return dataclasses.replace(manifest, **{k: np.asarray(saved[k], np.float64) for k in STATISTICS})


class TrainState:
    """Where the run stands: the global step, each finished epoch's metrics, and this rank's sums of the epoch under
    way (on the device until the epoch ends)."""

    def __init__(self, num_classes: int, steps_per_epoch: int, device):
        self.spe, self.device, self.step, self.history = steps_per_epoch, device, 0, []
        self.loss = torch.zeros((), device=device)
        self.classes = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.wait_s = self.train_s = 0.0

    def add(self, loss: torch.Tensor, labels: torch.Tensor, wait_s: float) -> None:
        """One step's loss, labels and data wait into the epoch's sums, on the device (no host sync)."""
        self.loss += loss
        self.classes.index_add_(0, labels.to(self.device), torch.ones_like(labels, device=self.device))
        self.wait_s += wait_s
        self.step += 1

    def new_epoch(self) -> None:
        self.loss, self.wait_s, self.train_s = torch.zeros_like(self.loss), 0.0, 0.0
        self.classes = torch.zeros_like(self.classes)

    def partial(self) -> dict | None:
        """This rank's sums of an epoch whose row is not in history yet (None between epochs)."""
        if len(self.history) * self.spe == self.step:
            return None
        return {
            "loss": self.loss.cpu(),
            "classes": self.classes.cpu(),
            "wait_s": torch.tensor(self.wait_s),
            "train_s": torch.tensor(self.train_s),
        }

    def state_dict(self, world: int) -> dict:
        """The step, history and every rank's partial sums (gathered: a collective under torchrun)."""
        return {"step": self.step, "history": self.history, "partial": every_rank(self.partial(), world)}

    def load_state_dict(self, state: dict, rank: int) -> None:
        self.step, self.history, partial = state["step"], state["history"], state["partial"]
        if isinstance(partial, list):  # one per rank; older checkpoints hold rank 0's alone
            partial = partial[rank]
        if partial is not None:
            self.loss, self.classes = partial["loss"].to(self.device), partial["classes"].to(self.device)
            self.wait_s, self.train_s = float(partial["wait_s"]), float(partial["train_s"])
