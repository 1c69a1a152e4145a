"""Train AlexNet (Krizhevsky, Sutskever & Hinton, 2012) on DALI-read ImageNet shards, and evaluate it.

python run.py --shards DIR --workdir DIR [options]         one GPU (bf16, channels-last), or the CPU
torchrun --nproc-per-node N run.py --shards DIR ...         data parallel (NCCL on GPUs, gloo on CPUs)
python run.py --demo [--workdir DIR]                        synthetic data -> shards -> train -> evaluate
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from model import checkpoint
from model.agreement import Preemption, Refused, agree
from model.checkpoint import CheckpointError
from model.parallel import Context, all_gather, all_sum, process_context
from model.recipe import (
    AMP_DTYPES,
    ComputeSettings,
    RecipeSettings,
    count_errors,
    initialise,
    lr_at,
    make_train_step,
    scaled_lr,
    set_lr,
    sgd,
)
from model.workdir import WorkdirBusy, WorkdirLock, data_identity, other_classes, other_data, remove_temporaries
from pipeline.atomic import atomic_write
from pipeline.augment import WINDOW_AUGMENTS
from pipeline.manifest import ShardError, check_crop, load_manifest
from pipeline.settings import LoaderSettings, above, at_least, option, show
from pipeline.settings import parse as parse_settings
from pipeline.threads import default_threads
from tools.demo import DEMO_PRESET, make_demo_data, report_demo


@dataclass(kw_only=True)
class Config(RecipeSettings, LoaderSettings, ComputeSettings):
    """The run"""

    shards: str = option("", "a folder written by tools/shard_imagenet.py")
    workdir: str = option("runs/alexnet", "the run's folder: config, metrics, checkpoints; one run at a time")
    towers: int = option(2, "§3.5: two towers, run on one device as a block-diagonal conv; 1: no split", choices=(1, 2))
    model_parallel: bool = option(False, "§3.2: the two towers on two GPUs per process")
    augment: str = option(
        "paper",
        "§4.1: random crops, flips, PCA lighting | inception (Szegedy et al. 2015)",
        choices=("paper", "inception"),
    )
    ten_crop: bool = option(False, "§4.1: at the end, also average the softmax over ten views")
    log_interval: int = option(50, "steps between progress lines (the only host syncs of the loop)", check=at_least(1))
    checkpoint_minutes: float = option(30.0, "also checkpoint this often within an epoch", check=above(0))
    keep: int = option(
        3, "step checkpoints kept besides best.pt (a restart continues from the newest)", check=at_least(1)
    )
    max_steps: int = option(0, "stop (with a checkpoint) at this global step; 0: run all epochs", check=at_least(0))
    resume: bool = option(
        False,
        "continue the run in --workdir, and fail if there is nothing to continue (the "
        "same command without it continues too, or starts)",
    )
    eval: str = option("", "a checkpoint to evaluate only")
    demo: bool = option(False, "make a small synthetic ImageNet, shard it, train and evaluate (no download)")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


# Settings a --resume may change; anything else must match the run being continued.
RESUMABLE = {
    "shards",
    "workdir",
    "lr",
    "epochs",
    "max_steps",
    "resume",
    "log_interval",
    "checkpoint_minutes",
    "keep",
    "ten_crop",
    "compile",
    "eval",
    "threads",
    "prefetch",
}
REFUSALS = (UsageError, ShardError, CheckpointError, WorkdirBusy)
log = logging.getLogger("run")


def demo_preset(given: dict) -> dict:
    """--demo: the demo's recipe for this machine's device, under whatever was given."""
    if not given.get("demo"):
        return {}
    device = ComputeSettings(device=given.get("device", "auto")).resolve_device()["device"]
    return {**DEMO_PRESET[device], "workdir": time.strftime("runs/demo-%Y%m%d-%H%M%S")}


def parse(argv=None) -> Config:
    """The settings: declared defaults, the demo's preset with --demo, --config, then the flags; all checked."""
    cfg, _ = parse_settings(Config, argv, prog="run.py", description=__doc__, preset=demo_preset)
    return replace(cfg, **cfg.resolve_device(), threads=cfg.threads or default_threads())


class Diverged(Exception):
    """The loss or the weights are not finite: one line naming the last good checkpoint, exit status 1."""


def setup(cfg: Config) -> Context:
    """This process's place from torchrun's environment, checked before anything is written."""
    try:
        return process_context(cfg.device, cfg.model_parallel, cfg.towers)
    except ValueError as e:
        raise UsageError(str(e)) from None


def init_group(backend: str, ctx: Context) -> None:
    """The process group, its keys apart for each of torchrun's restarts: the store outlives a restarted group, and
    a rank that read the dead group's addresses could not connect (seen with torch 2.13's torchrun --max-restarts)."""
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world)


def setup_logging(rank: int) -> None:
    """Progress on stdout, warnings and errors on stderr, from rank 0 alone (the others would repeat its lines)."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    for stream, wanted in (
        (sys.stdout, lambda r: r.levelno < logging.WARNING),
        (sys.stderr, lambda r: r.levelno >= logging.WARNING),
    ):
        handler = logging.StreamHandler(stream)
        handler.addFilter(lambda r, wanted=wanted: rank == 0 and wanted(r))
        log.addHandler(handler)


def load_data(cfg: Config, ctx: Context):
    """The shard folder's manifest, checked against the settings before anything is built or written."""
    manifest = load_manifest(cfg.shards)
    for split in ("val", "train") if cfg.augment in WINDOW_AUGMENTS else ("val",):
        check_crop(manifest, split, cfg.crop_size)
    if cfg.batch_size * ctx.world > manifest.count("train"):
        raise UsageError(
            f"--batch-size {cfg.batch_size} x {ctx.world} process(es) is more than the "
            f"{manifest.count('train')} train images in {cfg.shards}; pass a smaller --batch-size"
        )
    return manifest


def check_shard_sizes(manifest) -> None:
    """A stat per train shard before each epoch: DALI maps the tars, so one truncated under it would end in SIGBUS."""
    for s in manifest.shards("train"):
        size = s.tar.stat().st_size if s.tar.exists() else 0
        if size != s.tar_bytes:
            raise ShardError(
                f"{s.tar}: {size} bytes now, the manifest says {s.tar_bytes} (changed during the run); "
                f"restore the shard folder, then run the same command to continue"
            )


def continue_or_start(cfg: Config, ctx: Context, manifest) -> str | None:
    """The checkpoint this run continues from (the newest readable one in WORKDIR), or None to start from step 0."""
    workdir = Path(cfg.workdir)
    for p in remove_temporaries(workdir):
        log.info(f"removed {p}, left by an interrupted write")
    found = checkpoint.load_latest(workdir / "checkpoints", warn=log.warning)
    if found is None:
        if cfg.resume:
            raise UsageError(
                f"--resume: {workdir / 'checkpoints'} has no readable checkpoint to continue; "
                f"run without --resume to start"
            )
        saved = workdir / "config.json"  # a run stopped before its first checkpoint: the same settings start again
        if saved.exists():
            refuse_changes(cfg, json.loads(saved.read_text()), saved)
        return None
    ckpt, path = found
    if isinstance(ckpt.get("loader"), dict):  # one loader state per rank since DALI's own checkpoints hold them
        raise UsageError(
            f"{path} was written by an older run.py, whose loader position this one cannot continue "
            f"exactly; evaluate it with --eval {path}, or train anew in another --workdir"
        )
    refuse_changes(cfg, ckpt["config"], path)
    if ckpt["world_size"] != ctx.world:
        raise UsageError(f"{path} was written by {ckpt['world_size']} processes; continue it with as many")
    what = "data" in ckpt and other_data(ckpt["data"], data_identity(manifest))
    if what:
        raise UsageError(
            f"{path} was trained on {what}; pass the --shards it was trained on "
            f"({ckpt['config']['shards']}), or a new --workdir"
        )
    return str(path)


def refuse_changes(cfg: Config, saved: dict, where: Path) -> None:
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in changed)
        raise UsageError(f"{where} was trained with {was}; pass the same settings to continue it, or a new --workdir")


def build(cfg: Config, ctx: Context, num_classes: int):
    """The model (channels-last, DDP-wrapped under torchrun) and the bare module whose weights are saved."""
    from model import AlexNet, ModelParallelAlexNet

    if cfg.model_parallel:
        raw = ModelParallelAlexNet(devices=tuple(str(d) for d in ctx.devices), num_classes=num_classes)
    else:
        raw = AlexNet(num_classes=num_classes, towers=cfg.towers).to(ctx.devices[0])
    initialise(raw, cfg.init)
    raw = raw.to(memory_format=torch.channels_last)
    if ctx.world == 1:  # under DDP, rank 0's initial weights are broadcast to the others
        return raw, raw
    ids = [ctx.devices[0]] if cfg.device == "cuda" and not cfg.model_parallel else None
    return torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids), raw


def make_loader(cfg: Config, ctx: Context, manifest, split: str, augment: str, crop_size: int):
    from pipeline import DaliLoader

    dev = ctx.devices[0]
    return DaliLoader(
        manifest,
        split,
        cfg.batch_size,
        augment=augment,
        crop_size=crop_size,
        device=dev.type,
        device_id=dev.index if dev.type == "cuda" else None,
        rank=ctx.rank,
        world_size=ctx.world,
        seed=cfg.seed,
        num_threads=cfg.threads,
        hw_decoder_load=cfg.hw_decoder_load,
        prefetch=cfg.prefetch,
        dtype=AMP_DTYPES[cfg.amp] or torch.float32,
        divide_std=cfg.divide_std,
    )


def evaluate(model, loader, amp: str, ctx: Context, views: int = 1) -> dict:
    """Top-1/top-5 error on val, every rank's share counted once; views=10 averages ten crops' softmax (§4.1)."""
    top1, top5, n = all_sum(count_errors(model, loader, amp, views, ctx.devices[0]), ctx).tolist()
    return {"top1_err": top1 / max(n, 1), "top5_err": top5 / max(n, 1), "samples": n}


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


class TrainState:
    """Where the run stands: the global step, each finished epoch's metrics, and the sums of the epoch under way
    (on the device until the epoch ends)."""

    def __init__(self, num_classes: int, steps_per_epoch: int, device):
        self.spe, self.device, self.step, self.history = steps_per_epoch, device, 0, []
        self.loss = torch.zeros((), device=device)
        self.classes = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.wait_s = self.train_s = 0.0

    def new_epoch(self) -> None:
        self.loss, self.wait_s, self.train_s = torch.zeros_like(self.loss), 0.0, 0.0
        self.classes = torch.zeros_like(self.classes)

    def state_dict(self) -> dict:
        within = self.step % self.spe != 0  # at an epoch's end its sums are in history already
        partial = (
            {
                "loss": self.loss.cpu(),
                "classes": self.classes.cpu(),
                "wait_s": torch.tensor(self.wait_s),
                "train_s": torch.tensor(self.train_s),
            }
            if within
            else None
        )
        return {"step": self.step, "history": self.history, "partial": partial}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, partial = state["step"], state["history"], state["partial"]
        if partial is not None:
            self.loss, self.classes = partial["loss"].to(self.device), partial["classes"].to(self.device)
            self.wait_s, self.train_s = float(partial["wait_s"]), float(partial["train_s"])


class Trainer:
    """One run: model, optimiser, train step and loaders, and its TrainState."""

    def __init__(self, cfg: Config, ctx: Context, manifest, preemption: Preemption):
        torch.manual_seed(cfg.seed + ctx.rank)
        self.cfg, self.ctx, self.manifest, self.preemption, self.dev = cfg, ctx, manifest, preemption, ctx.devices[0]
        # The loaders first: they check the settings against the shards (crop size) before the model is built.
        self.train_loader = make_loader(cfg, ctx, manifest, "train", cfg.augment, cfg.crop_size)
        self.val_loader = make_loader(cfg, ctx, manifest, "val", "center", cfg.crop_size)
        self.model, self.raw = build(cfg, ctx, manifest.num_classes)
        self.optimizer = sgd(self.raw, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.train_step = make_train_step(self.model, self.optimizer, cfg.amp, cfg.compile != "off" and cfg.compile)
        self.spe, self.global_batch = len(self.train_loader), cfg.batch_size * ctx.world
        self.base_lr = scaled_lr(cfg.lr, self.global_batch) if cfg.lr_scaling == "linear" else cfg.lr
        self.state = TrainState(manifest.num_classes, self.spe, self.dev)
        self.workdir, self.lr, self.saved = Path(cfg.workdir), self.base_lr, None
        log.info(
            f"{manifest.count('train')} train images, {manifest.num_classes} classes; {ctx.world} process(es) x "
            f"batch {cfg.batch_size} = {self.global_batch}, {self.spe} steps per epoch; lr {self.base_lr:g}"
            + (f" ({cfg.lr} at batch 128, scaled linearly)" if cfg.lr_scaling == "linear" else "")
        )

    def resume(self, ckpt: dict, path: str) -> None:
        """Weights, optimiser, RNG states, the TrainState, and this rank's loader where it stood."""
        checkpoint.restore_training(ckpt, self.raw, self.optimizer, self.train_step.scaler)
        checkpoint.set_rng_state(ckpt["rng"][self.ctx.rank])
        try:
            self.train_loader.load_state_dict(ckpt["loader"][self.ctx.rank])
        except ValueError as e:  # e.g. --shards now names a folder sharded anew: other samples, other batches
            raise UsageError(f"{path}: {e}") from None
        self.state.load_state_dict(ckpt)
        self.saved = path
        log.info(f"continuing from {path}: epoch {self.state.step // self.spe + 1}, step {self.state.step}")

    def train_epoch(self, epoch: int) -> str | None:
        """The epoch's steps (the rest of them after a restart); returns why it stopped early, or None."""
        cfg, dev, spe, st = self.cfg, self.dev, self.spe, self.state
        self.train_loader.set_epoch(epoch)  # a check: the loader stands in this epoch (inside it, after a restart)
        val_errors = [r["val_top1_err"] for r in st.history]
        t_epoch = t_log = time.perf_counter()
        t_save, n_log, wait_log, loss_log = time.monotonic(), 0, 0.0, torch.zeros((), device=dev)
        stop = None
        for wait, (images, labels) in timed(self.train_loader):
            self.lr = lr_at(
                cfg.schedule,
                self.base_lr,
                st.step,
                spe,
                cfg.epochs,
                warmup_steps=round(cfg.warmup_epochs * spe),
                val_errors=val_errors,
            )
            set_lr(self.optimizer, self.lr)
            loss = self.train_step(images, labels)
            st.loss += loss
            loss_log += loss
            st.classes.index_add_(0, labels.to(dev), torch.ones_like(labels, device=dev))
            st.wait_s += wait
            st.step, n_log, wait_log = st.step + 1, n_log + 1, wait_log + wait
            stop = self.preemption.agreed() or ("max_steps" if st.step == cfg.max_steps else None)
            if st.step % cfg.log_interval and not stop:
                continue
            # The loop's only host syncs: the interval's loss, and whether any rank is due a timed checkpoint.
            due = time.monotonic() - t_save > 60 * cfg.checkpoint_minutes
            stats = all_sum(torch.stack([loss_log, torch.tensor(float(due), device=dev)]), self.ctx).tolist()
            interval_loss, dt = stats[0] / (n_log * self.ctx.world), time.perf_counter() - t_log
            if not math.isfinite(interval_loss):
                raise self.diverged(f"loss is {interval_loss}")
            left = (cfg.epochs * spe - st.step) * dt / n_log
            log.info(
                f"epoch {epoch + 1}/{cfg.epochs} step {st.step - epoch * spe}/{spe} loss {interval_loss:.4f} "
                f"lr {self.lr:.3g} {n_log * self.global_batch / dt:,.0f} img/s data-wait {wait_log / dt:.0%} "
                f"eta {left / 60:.1f} min"
            )
            t_log, n_log, wait_log, loss_log = time.perf_counter(), 0, 0.0, torch.zeros((), device=dev)
            if (stats[1] > 0 or stop) and st.step % spe:  # at the epoch's end, end_epoch saves
                st.train_s += time.perf_counter() - t_epoch
                t_epoch, t_save = time.perf_counter(), time.monotonic()
                self.save()
            if stop:
                break
        st.train_s += time.perf_counter() - t_epoch
        return stop

    def end_epoch(self, epoch: int) -> dict:
        """Validation, the epoch's row of metrics.jsonl, its checkpoint (best.pt if best); returns the row."""
        ctx, spe, st, t_eval = self.ctx, self.spe, self.state, time.perf_counter()
        totals = all_sum(torch.cat([st.loss.double().view(1), st.classes.double()]), ctx)
        ranks = all_gather(
            torch.tensor([st.step - epoch * spe, int(st.classes.sum())], dtype=torch.float64, device=self.dev), ctx
        )
        val = evaluate(self.raw, self.val_loader, self.cfg.amp, ctx)
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
        return {**row, "samples_seen_per_class": [int(c) for c in totals[1:]], "val_samples": val["samples"]}

    def summary(self, last: dict) -> dict:
        """summary.json: the last epoch's errors, the run's shape and cost, and with --ten-crop its errors too."""
        cfg, m, history = self.cfg, self.manifest, self.state.history
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
        """A checkpoint of all a restart needs, written by rank 0 (every rank's RNG and loader state gathered)."""
        if not checkpoint.is_finite(self.raw, self.dev):
            raise self.diverged("the weights are not finite")
        state = {
            "config": asdict(self.cfg),
            "world_size": self.ctx.world,
            "data": data_identity(self.manifest),
            **self.state.state_dict(),
            **checkpoint.training_state(self.raw, self.optimizer, self.train_step.scaler),
            "rng": checkpoint.every_rank(checkpoint.rng_state(), self.ctx.world),
            "loader": checkpoint.every_rank(self.train_loader.state_dict(), self.ctx.world),
        }
        self.saved = str(checkpoint.path_for(self.workdir / "checkpoints", self.state.step))
        if self.ctx.rank == 0:
            checkpoint.save(self.workdir / "checkpoints", state, self.state.step, self.cfg.keep, best)
            log.info(f"checkpoint {self.saved}")

    def write_metrics(self) -> None:
        from tools.plot_metrics import (
            write_metrics,  # imports matplotlib: not for --help or bad input
        )

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


def train(cfg: Config, ctx: Context, manifest, start: str | None, preemption: Preemption) -> int:
    """The recipe epoch by epoch, from step 0 or from the checkpoint `start`; WORKDIR gets metrics and summary.json."""
    t = Trainer(cfg, ctx, manifest, preemption)
    if start is not None:
        t.resume(checkpoint.read(start), start)
    if ctx.rank == 0:
        t.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write(t.workdir / "config.json", json.dumps(asdict(cfg), indent=1).encode())
    t.write_metrics()
    total = cfg.epochs * t.spe
    if t.state.step >= total or 0 < cfg.max_steps <= t.state.step:
        log.info(f"{t.workdir}: at step {t.state.step} already; pass a larger --epochs (or --max-steps) to train on")
        return 0
    try:
        for epoch in range(t.state.step // t.spe, cfg.epochs):
            check_shard_sizes(manifest)
            stop = t.train_epoch(epoch)
            if t.state.step % t.spe == 0:  # the epoch ran to its end
                last = t.end_epoch(epoch)
                stop = preemption.agreed() or stop or ("max_steps" if 0 < cfg.max_steps <= t.state.step else None)
                stop = None if t.state.step == total else stop  # the run is done: its summary follows
            if stop:
                return t.stopped(stop)
    except Diverged as e:
        log.error(str(e))
        return 1
    summary = t.summary(last)
    if ctx.rank == 0:
        atomic_write(t.workdir / "summary.json", json.dumps(summary, indent=1).encode())
    t.train_loader.close()
    t.val_loader.close()
    return 0


def evaluate_only(cfg: Config, ctx: Context) -> int:
    """--eval CHECKPOINT: centre-crop (and with --ten-crop, ten-crop) error of saved weights on the val split."""
    ckpt = checkpoint.read(cfg.eval)
    manifest = load_manifest(cfg.shards or ckpt["config"]["shards"])
    known = {f.name for f in fields(Config)}  # a checkpoint of an older run.py may hold settings since renamed
    saved = Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    check_crop(manifest, "val", saved.crop_size)
    classes = ckpt["data"]["classes"] if "data" in ckpt else [None] * ckpt["model"]["fc8.weight"].shape[0]
    differs = other_classes(
        classes, [c["wnid"] for c in manifest.classes] if "data" in ckpt else [None] * manifest.num_classes
    )
    if differs:
        raise UsageError(f"--eval: {cfg.eval} was trained on {differs}; evaluate it on shards of its own classes")
    cfg = replace(cfg, divide_std=saved.divide_std)  # the inputs as the weights were trained on
    _, raw = build(Config(**{**asdict(saved), "model_parallel": cfg.model_parallel}), ctx, manifest.num_classes)
    raw.load_state_dict(ckpt["model"])
    result = {"checkpoint": cfg.eval, "step": ckpt["step"], "num_classes": manifest.num_classes}
    for augment, views in [("center", 1)] + [("tencrop", 10)] * cfg.ten_crop:
        with make_loader(cfg, ctx, manifest, "val", augment, saved.crop_size) as loader:
            errs = evaluate(raw, loader, cfg.amp, ctx, views)
        result[augment] = errs
        log.info(
            f"{augment}: val top-1 error {errs['top1_err']:.2%}, top-5 error {errs['top5_err']:.2%} "
            f"on {errs['samples']} images"
        )
    log.info(json.dumps(result))
    return 0


def main(argv=None) -> int:
    t0 = time.perf_counter()
    cfg = parse(argv)
    if cfg.demo and not cfg.shards:
        cfg.shards = str(Path(cfg.workdir) / "shards")
    lock, preemption = WorkdirLock(Path(cfg.workdir)), None
    try:
        ctx = setup(cfg)
        setup_logging(ctx.rank)
        if not cfg.eval and not cfg.shards:
            raise UsageError("--shards DIR is required: a folder written by tools/shard_imagenet.py (or try --demo)")
        manifest = load_data(cfg, ctx) if not (cfg.eval or cfg.demo) else None  # read only: nothing written yet
        if cfg.device == "cuda":
            torch.cuda.set_device(ctx.devices[0])
            torch.backends.cudnn.benchmark = True
        if ctx.world > 1:  # first: every decision below is rank 0's, given to the others through the group
            init_group("nccl" if cfg.device == "cuda" else "gloo", ctx)
        if cfg.eval:
            return evaluate_only(cfg, ctx)
        preemption = Preemption(ctx.world)  # from here on, SIGTERM and SIGINT stop the run after a step
        agree(ctx.rank, ctx.world, lock.acquire, REFUSALS)  # rank 0 holds WORKDIR/run.lock until this process ends
        if cfg.demo:
            agree(ctx.rank, ctx.world, lambda: make_demo_data(cfg), REFUSALS)
            manifest = load_data(cfg, ctx)
        start = agree(ctx.rank, ctx.world, lambda: continue_or_start(cfg, ctx, manifest), REFUSALS)
        log.info(show(cfg))
        code = train(cfg, ctx, manifest, start, preemption)
        if cfg.demo and ctx.rank == 0 and code == 0 and (Path(cfg.workdir) / "summary.json").exists():
            report_demo(cfg, time.perf_counter() - t0)
        return code
    except REFUSALS as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    except Refused:
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(
            f"run.py: cannot write {e.filename} ({e.strerror}); the checkpoints written before are intact: make "
            f"room, then run the same command to continue",
            file=sys.stderr,
        )
        return 1
    finally:
        if preemption is not None:
            preemption.close()
        lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
