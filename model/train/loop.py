"""One training run (its model and loaders made by build.py) and its loop: train_one_epoch's steps and, between two
steps, Trainer.after_step (progress, checkpoints, the epoch's end and the one decision to stop). run.py decides
whether to start or continue, and drives it."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch

from model.train import checkpoint
from model.train.build import build, evaluate, make_loader
from model.train.checkpoint import CheckpointError, TrainState, statistics
from model.train.cluster import Context, Preemption, all_gather, all_sum, barrier
from model.train.config import Config, saved_settings
from model.train.recipe import lr_at, make_loss, make_scaler, scaled_lr, set_lr, sgd
from model.train.workdir import data_identity
from pipeline.manifest import Manifest, ShardError

log = logging.getLogger("run")  # run.py's: its handlers print rank 0's lines


class Diverged(Exception):
    """The loss or the weights are not finite: one line naming the last good checkpoint, exit status 1."""


def check_shards(manifest: Manifest, split: str) -> None:
    """A stat per shard of `split` before each pass: a shard rewritten since the manifest is named before it is read."""
    for s in manifest.shards(split):
        size = s.tar.stat().st_size if s.tar.exists() else 0
        if size != s.tar_bytes:
            raise ShardError(
                f"{s.tar}: {size} bytes now, the manifest says {s.tar_bytes} (changed during the run); "
                f"restore the shard folder, then run the same command to continue"
            )


def timed(loader):
    """(seconds spent waiting for data, batch) for each batch: the data-wait figures. A host that ran ahead of the GPU
    is held back inside next() too (loader.gpu_wait_s); that is the GPU being busy, not waiting, so it is left out."""
    batches = iter(loader)
    while True:
        t0, held = time.perf_counter(), loader.gpu_wait_s
        batch = next(batches, None)
        if batch is None:
            return
        yield time.perf_counter() - t0 - (loader.gpu_wait_s - held), batch


def train_one_epoch(t: Trainer, epoch: int) -> str | signal.Signals | None:
    """The epoch's steps (the rest of them after a restart); returns why the run stops early, or None."""
    model, optimizer, scaler, loss_fn = t.model, t.optimizer, t.scaler, t.loss_fn
    t.begin_epoch(epoch)
    model.train()
    for wait, (images, labels) in timed(t.train_loader):
        set_lr(optimizer, t.lr_at(t.state.step))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(images, labels)  # forward and cross-entropy: what --compile compiles
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16: the loss scaled, the step skipped where the gradients overflowed
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        stop = t.after_step(epoch, loss.detach(), labels, wait)
        if stop:
            return stop
    return None


class Trainer:
    """One run: model, optimiser, loss and loaders, its TrainState, and what happens between two steps."""

    def __init__(self, cfg: Config, ctx: Context, manifest: Manifest, preemption: Preemption):
        torch.manual_seed(cfg.seed + ctx.rank)
        self.cfg, self.ctx, self.manifest, self.preemption, self.dev = cfg, ctx, manifest, preemption, ctx.devices[0]
        # The loaders first: they check the settings against the shards (crop size) before the model is built.
        self.train_loader = make_loader(cfg, ctx, manifest, "train", cfg.augment, cfg.crop_size)
        self.val_loader = make_loader(cfg, ctx, manifest, "val", "center", cfg.crop_size)
        self.model, self.raw = build(cfg, ctx, manifest.num_classes)
        self.optimizer = sgd(self.raw, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.loss_fn = make_loss(self.model, cfg.amp, cfg.compile != "off" and cfg.compile)
        self.scaler = make_scaler(self.raw, cfg.amp)
        self.spe, self.global_batch = len(self.train_loader), cfg.batch_size * ctx.world
        self.total = cfg.epochs * self.spe
        self.base_lr = scaled_lr(cfg.lr, self.global_batch) if cfg.lr_scaling == "linear" else cfg.lr
        self.state = TrainState(manifest.num_classes, self.spe, self.dev)
        self.workdir, self.lr, self.saved, self.last = Path(cfg.workdir), self.base_lr, None, None
        self.t_epoch = None  # when the epoch's training time last started counting (None between epochs)
        log.info(
            f"{manifest.count('train')} train images, {manifest.num_classes} classes; {ctx.world} process(es) x "
            f"batch {cfg.batch_size} = {self.global_batch}, {self.spe} steps per epoch; lr {self.base_lr:g}"
            + (f" ({cfg.lr} at batch 128, scaled linearly)" if cfg.lr_scaling == "linear" else "")
        )

    def resume(self, ckpt: dict, path: str) -> None:
        """Weights, optimiser, RNG states, the TrainState, and this rank's loader where it stood."""
        checkpoint.restore_training(ckpt, self.raw, self.optimizer, self.scaler)
        checkpoint.set_rng_state(ckpt["rng"][self.ctx.rank])
        try:
            self.train_loader.load_state_dict(ckpt["loader"][self.ctx.rank])
        except ValueError as e:  # e.g. --shards now names a folder sharded anew: other samples, other batches
            raise CheckpointError(f"{path}: {e}") from None
        self.state.load_state_dict(ckpt, self.ctx.rank)
        self.saved = path

    @property
    def done(self) -> bool:
        """Whether every epoch is trained and validated."""
        return len(self.state.history) >= self.cfg.epochs

    def fit(self) -> str | signal.Signals | None:
        """The epochs left, one train_one_epoch each; returns why the run stopped early, or None when it is done."""
        st = self.state
        if len(st.history) < st.step // self.spe:  # stopped between an epoch's last step and its validation
            self.end_epoch(len(st.history))
        for epoch in range(st.step // self.spe, self.cfg.epochs):
            stop = train_one_epoch(self, epoch)
            if stop:
                return stop
        return None

    def begin_epoch(self, epoch: int) -> None:
        check_shards(self.manifest, "train")
        self.train_loader.set_epoch(epoch)  # a check: the loader stands in this epoch (inside it, after a restart)
        self.t_epoch = self.t_log = time.perf_counter()
        self.t_save, self.n_log, self.wait_log = time.monotonic(), 0, 0.0
        self.loss_log = torch.zeros((), device=self.dev)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        self.lr = lr_at(
            cfg.schedule,
            self.base_lr,
            step,
            self.spe,
            cfg.epochs,
            warmup_steps=round(cfg.warmup_epochs * self.spe),
            val_errors=[r["val_top1_err"] for r in self.state.history],
        )
        return self.lr

    def after_step(self, epoch: int, loss: torch.Tensor, labels: torch.Tensor, wait: float):
        """Everything between two steps, in order: the sums, the epoch's end, the stop decision, progress and
        checkpoints. Returns why the run stops after this step, or None."""
        st = self.state
        st.add(loss, labels, wait)
        self.loss_log += loss
        self.n_log, self.wait_log = self.n_log + 1, self.wait_log + wait
        within = st.step % self.spe != 0
        if not within:
            if st.step % self.cfg.log_interval == 0:
                self.progress(epoch)
            self.end_epoch(epoch)  # validation, metrics, the epoch's checkpoint
        stop = self.stop_reason(overlapped=within)
        if within and (st.step % self.cfg.log_interval == 0 or stop):
            if self.progress(epoch) or stop:
                self.save()
        return stop

    def stop_reason(self, overlapped: bool) -> str | signal.Signals | None:
        """The one place the run decides to stop early: a signal to any rank (a collective: inside an epoch overlapped
        with the next step, so the ranks stop one step later, all after the same one), or --max-steps."""
        sig = self.preemption.agreed(overlapped=overlapped)
        if self.state.step == self.total:  # the run is done: its summary follows
            return None
        return sig or ("max_steps" if 0 < self.cfg.max_steps <= self.state.step else None)

    def progress(self, epoch: int) -> bool:
        """The interval's progress line; returns whether any rank is due a timed checkpoint. The loop's only host
        syncs: the interval's loss, and that flag."""
        cfg, st, dev = self.cfg, self.state, self.dev
        due = time.monotonic() - self.t_save > 60 * cfg.checkpoint_minutes
        stats = all_sum(torch.stack([self.loss_log, torch.tensor(float(due), device=dev)]), self.ctx).tolist()
        interval_loss, dt = stats[0] / (self.n_log * self.ctx.world), time.perf_counter() - self.t_log
        if not math.isfinite(interval_loss):
            raise self.diverged(f"loss is {interval_loss}")
        left = (self.total - st.step) * dt / self.n_log
        log.info(
            f"epoch {epoch + 1}/{cfg.epochs} step {st.step - epoch * self.spe}/{self.spe} loss {interval_loss:.4f} "
            f"lr {self.lr:.3g} {self.n_log * self.global_batch / dt:,.0f} img/s data-wait {self.wait_log / dt:.0%} "
            f"eta {left / 60:.1f} min"
        )
        self.t_log, self.n_log, self.wait_log = time.perf_counter(), 0, 0.0
        self.loss_log = torch.zeros((), device=dev)
        return stats[1] > 0

    def end_epoch(self, epoch: int) -> dict:
        """Validation, the epoch's row of metrics.jsonl, its checkpoint (best.pt if best); returns the row."""
        ctx, spe, st = self.ctx, self.spe, self.state
        if self.t_epoch is not None:
            st.train_s += time.perf_counter() - self.t_epoch
        t_eval = time.perf_counter()
        totals = all_sum(torch.cat([st.loss.double().view(1), st.classes.double()]), ctx)
        ranks = all_gather(
            torch.tensor([st.step - epoch * spe, int(st.classes.sum())], dtype=torch.float64, device=self.dev), ctx
        )
        try:
            val = evaluate(
                self.raw, self.val_loader, self.cfg.amp, ctx, check=lambda: check_shards(self.manifest, "val")
            )
        except ShardError as e:  # on every rank: the epoch's training is kept, a continued run validates it first
            self.save()
            raise ShardError(
                f"{e} (validating epoch {epoch + 1} at step {st.step}; its training is saved in {self.saved})"
            ) from None
        row = {
            "epoch": epoch + 1,
            "step": st.step,
            "train_loss": float(totals[0]) / (spe * ctx.world),
            "val_top1_err": val["top1_err"],
            "val_top5_err": val["top5_err"],
            "lr": self.lr,
            "img_per_s": spe * self.global_batch / st.train_s,
            "data_wait_frac": st.wait_s / st.train_s,
            "samples_seen": int(totals[1:].sum()),
            "epoch_s": st.train_s + time.perf_counter() - t_eval,
            "steps_per_rank": [int(r[0]) for r in ranks],
            "samples_seen_per_rank": [int(r[1]) for r in ranks],
        }
        if not math.isfinite(row["train_loss"]):
            raise self.diverged(f"loss is {row['train_loss']}")
        st.history.append(row)
        st.new_epoch()
        log.info(
            f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {row['train_loss']:.4f}, "
            f"val top-1 error {val['top1_err']:.1%}, top-5 error {val['top5_err']:.1%}, "
            f"{row['img_per_s']:,.0f} img/s, data-wait {row['data_wait_frac']:.0%}"
        )
        self.save(best=val["top1_err"] <= min(r["val_top1_err"] for r in st.history))
        self.write_metrics()
        self.t_epoch = None
        self.last = {**row, "samples_seen_per_class": [int(c) for c in totals[1:]], "val_samples": val["samples"]}
        return self.last

    def summary(self) -> dict:
        """summary.json: the last epoch's errors, the run's shape and cost, and with --ten-crop its errors too."""
        cfg, m, history, last = self.cfg, self.manifest, self.state.history, self.last
        s = {
            "num_classes": m.num_classes,
            "val_top1_err": last["val_top1_err"],
            "val_top5_err": last["val_top5_err"],
            "train_loss": last["train_loss"],
            "chance_top1_err": 1 - 1 / m.num_classes,
            "world_size": self.ctx.world,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.spe,
            "samples_seen_per_epoch": last["samples_seen"],
            "samples_seen_per_rank": last["samples_seen_per_rank"],
            "steps_per_rank": last["steps_per_rank"],
            "samples_seen_per_class": last["samples_seen_per_class"],
            "train_samples": m.count("train"),
            "val_samples": last["val_samples"],
            "epochs": len(history),
            "device": cfg.device,
            "amp": cfg.amp,
            "wall_s": sum(r["epoch_s"] for r in history),
        }
        if cfg.ten_crop:
            t0 = time.perf_counter()
            with make_loader(cfg, self.ctx, self.manifest, "val", "tencrop", cfg.crop_size) as tencrop:
                ten = evaluate(self.raw, tencrop, cfg.amp, self.ctx, views=10)
            s.update(val_top1_err_10crop=ten["top1_err"], val_top5_err_10crop=ten["top5_err"])
            s["wall_s"] += time.perf_counter() - t0
            log.info(f"ten-crop: val top-1 error {ten['top1_err']:.1%}, top-5 error {ten['top5_err']:.1%}")
        return s

    def save(self, best: bool = False) -> None:
        """A checkpoint of all a restart needs, written by rank 0 (every rank's RNG, loader and sums gathered)."""
        if not checkpoint.is_finite(self.raw, self.dev):
            raise self.diverged("the weights are not finite")
        if self.t_epoch is not None and self.state.step % self.spe:  # the time trained so far
            self.state.train_s += time.perf_counter() - self.t_epoch
            self.t_epoch, self.t_save = time.perf_counter(), time.monotonic()
        state = {
            "config": saved_settings(self.cfg),
            "world_size": self.ctx.world,
            "data": data_identity(self.manifest),
            "statistics": statistics(self.manifest),
            **self.state.state_dict(self.ctx.world),
            **checkpoint.training_state(self.raw, self.optimizer, self.scaler),
            "rng": checkpoint.every_rank(checkpoint.rng_state(), self.ctx.world),
            "loader": checkpoint.every_rank(self.train_loader.state_dict(), self.ctx.world),
        }
        self.saved = str(checkpoint.path_for(self.workdir / "checkpoints", self.state.step))
        if self.ctx.rank == 0:
            checkpoint.save(self.workdir / "checkpoints", state, self.state.step, self.cfg.keep, best)
            log.info(f"checkpoint {self.saved}")
        barrier(self.ctx)  # no rank stops (and torchrun, seeing it end, stops the others) before the file is written

    def write_metrics(self) -> None:
        from model.train.metrics import write_metrics  # imports matplotlib: not for --help or bad input

        if self.ctx.rank == 0:
            write_metrics(self.workdir, self.state.history)

    def diverged(self, what: str) -> Diverged:
        last = checkpoint.step_files(self.workdir / "checkpoints")
        fix = (
            f"Last good checkpoint: {last[0]}; continue from it with --lr LOWER"
            if last
            else "No checkpoint was written yet; start again (in a new --workdir) with a lower --lr"
        )
        return Diverged(
            f"run.py: {what} at epoch {self.state.step // self.spe + 1}, step {self.state.step} "
            f"(lr {self.lr:.3g}); stopping. {fix}"
        )

    def stopped(self, why) -> int:
        """Says why the run stopped early and how to continue; the exit status (128 + the signal's number after one)."""
        if why == "max_steps":
            log.info(
                f"stopped at step {self.state.step} (--max-steps {self.cfg.max_steps}); run the same command "
                f"with a larger --max-steps (or 0) to continue"
            )
            return 0
        log.warning(
            f"run.py: {why.name}: stopped at epoch {self.state.step // self.spe + 1}, step {self.state.step}; "
            f"saved {self.saved}; run the same command to continue from it"
        )
        return 128 + why
