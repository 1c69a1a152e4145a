"""Train AlexNet (Krizhevsky, Sutskever & Hinton, 2012) on DALI-read ImageNet shards, and evaluate it.

    python run.py --shards DIR --workdir DIR [options]         one GPU (bf16, channels-last), or the CPU
    torchrun --nproc-per-node N run.py --shards DIR ...         data parallel (NCCL on GPUs, gloo on CPUs)
    python run.py --demo [--workdir DIR]                        synthetic data -> shards -> train -> evaluate
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from model import checkpoint
from model.checkpoint import CheckpointError
from model.parallel import Context, all_gather, all_sum, process_context
from model.recipe import (AMP_DTYPES, INITS, LR, MOMENTUM, SCHEDULES, WEIGHT_DECAY, count_errors, initialise, lr_at,
                          make_train_step, scaled_lr, set_lr, sgd)
from pipeline.manifest import ShardError, load_manifest
from pipeline.atomic import atomic_write
from pipeline.threads import default_threads
from tools.demo import DEMO_PRESET, make_demo_data, report_demo


@dataclass
class Config:
    shards: str = ""  # a folder written by tools/shard_imagenet.py
    workdir: str = "runs/alexnet"
    # §5: the optimisation recipe
    epochs: int = 90  # §5: "roughly 90 cycles through the training set"
    batch_size: int = 128  # §5, per process
    lr: float = LR  # §5, for a global batch of 128; scaled linearly with --lr-scaling linear
    lr_scaling: str = "linear"  # linear | none (Goyal et al. 2017, for large global batches)
    schedule: str = "paper"  # §5: /10 when val error stops improving | step | cosine
    warmup_epochs: float = 0.0  # linear warm-up (none in the paper; useful for large batches)
    momentum: float = MOMENTUM  # §5
    weight_decay: float = WEIGHT_DECAY  # §5
    init: str = "paper"  # §5: weights N(0, 0.01), some biases 1 | kaiming (He et al. 2015: learns sooner; the demo)
    # §3, §4: model and data
    towers: int = 2  # §3.5: two towers, one conv each, run on one device as a block-diagonal dense conv; 1 = no split
    model_parallel: bool = False  # §3.2: the two towers on two GPUs per process
    augment: str = "paper"  # §4.1: random 224 crops, flips, PCA lighting | inception
    crop_size: int = 224  # §3.5
    divide_std: bool = False  # §2 subtracts the mean only; also divide by the per-channel std
    ten_crop: bool = False  # §4.1: at the end, average the softmax over ten views
    # engineering
    device: str = "auto"  # cuda when there is one
    amp: str = "auto"  # bf16 on cuda, off on cpu | fp16
    compile: str = "off"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    seed: int = 0
    # the loader (tools/bench_io.py --sweep prints the fastest setting as these flags)
    threads: int = 0  # DALI CPU threads per process; 0: pipeline.threads.default_threads (cores left free, at most 8)
    hw_decoder_load: float = 0.65  # share of JPEGs for the GPU's hardware decoder (0.65: fastest on an H100)
    prefetch: int = 2  # batches DALI prepares ahead
    log_interval: int = 50  # steps between progress lines (the only host syncs of the loop)
    checkpoint_minutes: float = 30.0  # also checkpoint this often within an epoch
    keep: int = 3  # step checkpoints kept, besides best.pt
    max_steps: int = 0  # stop (with a checkpoint) at this global step; 0 = run all epochs
    resume: bool = False  # continue the run in --workdir from its latest good checkpoint
    eval: str = ""  # a checkpoint to evaluate only
    demo: bool = False  # make a small synthetic ImageNet, shard it, train and evaluate (no download)


CHOICES = {"init": INITS, "lr_scaling": ("linear", "none"), "schedule": SCHEDULES, "towers": (1, 2),
           "augment": ("paper", "inception"),
           "device": ("auto", "cuda", "cpu"), "amp": ("auto", "bf16", "fp16", "off"),
           "compile": ("off", "default", "reduce-overhead", "max-autotune")}
HELP = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))  # the comments above
# Settings a --resume may change; anything else must match the run being continued.
RESUMABLE = {"shards", "workdir", "lr", "epochs", "max_steps", "resume", "log_interval", "checkpoint_minutes", "keep",
             "ten_crop", "compile", "eval", "threads", "prefetch"}


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"run.py: {message} (see python run.py --help)\n")


def parse(argv=None) -> Config:
    """The Config from the command line; --demo swaps in the demo preset as the defaults."""
    p = Parser(description=__doc__.splitlines()[0])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=HELP.get(f.name))
        elif f.name == "compile":
            p.add_argument(flag, nargs="?", const="default", default="off", choices=CHOICES["compile"],
                           help=HELP[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=HELP.get(f.name))
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if args.demo:
        p.set_defaults(**DEMO_PRESET[device], workdir=time.strftime("runs/demo-%Y%m%d-%H%M%S"))
        args = p.parse_args(argv)
    cfg = Config(**{**vars(args), "device": device})
    if cfg.amp == "auto":
        cfg.amp = "bf16" if device == "cuda" else "off"
    if cfg.threads < 0 or cfg.prefetch < 1 or not 0.0 <= cfg.hw_decoder_load <= 1.0:
        p.error("--threads must be 0 (automatic) or more, --prefetch at least 1, --hw-decoder-load between 0 and 1")
    if cfg.threads == 0:
        cfg.threads = default_threads()
    return cfg


def setup(cfg: Config) -> Context:
    """This process's place from torchrun's environment, checked before anything is written."""
    try:
        return process_context(cfg.device, cfg.model_parallel, cfg.towers)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_workdir(cfg: Config, ctx: Context) -> dict | None:
    """The checkpoint to resume from (with --resume), after refusing a workdir that holds another run."""
    workdir = Path(cfg.workdir)
    if not cfg.resume:
        if (workdir / "config.json").exists():
            raise UsageError(f"{workdir}: holds a run already (config.json); pass --resume to continue it, "
                             f"or a new --workdir")
        return None
    found = checkpoint.load_latest(workdir / "checkpoints", warn=lambda m: print(m, file=sys.stderr))
    if found is None:
        raise UsageError(f"--resume: {workdir / 'checkpoints'} has no readable checkpoint; start without --resume")
    ckpt, path = found
    if isinstance(ckpt.get("loader"), dict):  # one loader state per rank since DALI's own checkpoints hold them
        raise UsageError(f"--resume: {path} was written by an older run.py, whose loader position this one cannot "
                         f"continue exactly; evaluate it with --eval {path}, or train anew in another --workdir")
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and ckpt["config"].get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {ckpt['config'].get(k)}" for k in changed)
        raise UsageError(f"--resume: {path} was trained with {was}; pass the same settings or use a new --workdir")
    if ckpt["world_size"] != ctx.world:
        raise UsageError(f"--resume: {path} was written by {ckpt['world_size']} processes; resume with as many")
    return ckpt


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
    return DaliLoader(manifest, split, cfg.batch_size, augment=augment, crop_size=crop_size, device=dev.type,
                      device_id=dev.index if dev.type == "cuda" else None, rank=ctx.rank, world_size=ctx.world,
                      seed=cfg.seed, num_threads=cfg.threads, hw_decoder_load=cfg.hw_decoder_load,
                      prefetch=cfg.prefetch, dtype=AMP_DTYPES[cfg.amp] or torch.float32, divide_std=cfg.divide_std)


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


class Stop(Exception):
    """Stop(exit status, message): training ends early, 0 at --max-steps, 1 when loss or weights are not finite."""


class Trainer:
    """One run: model, optimiser, train step and loaders, and where it stands (global step, per-epoch history)."""

    def __init__(self, cfg: Config, ctx: Context, manifest, log):
        torch.manual_seed(cfg.seed + ctx.rank)
        self.cfg, self.ctx, self.manifest, self.log, self.dev = cfg, ctx, manifest, log, ctx.devices[0]
        # The loaders first: they check the settings against the shards (crop size) before the model is built.
        self.train_loader = make_loader(cfg, ctx, manifest, "train", cfg.augment, cfg.crop_size)
        self.val_loader = make_loader(cfg, ctx, manifest, "val", "center", cfg.crop_size)
        self.model, self.raw = build(cfg, ctx, manifest.num_classes)
        self.optimizer = sgd(self.raw, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.train_step = make_train_step(self.model, self.optimizer, cfg.amp, cfg.compile != "off" and cfg.compile)
        self.spe, self.global_batch = len(self.train_loader), cfg.batch_size * ctx.world
        self.base_lr = scaled_lr(cfg.lr, self.global_batch) if cfg.lr_scaling == "linear" else cfg.lr
        self.workdir, self.history, self.step, self.partial, self.lr = Path(cfg.workdir), [], 0, None, self.base_lr
        log(f"{manifest.count('train')} train images, {manifest.num_classes} classes; {ctx.world} process(es) x batch "
            f"{cfg.batch_size} = {self.global_batch}, {self.spe} steps per epoch; lr {self.base_lr:g}"
            + (f" ({cfg.lr} at batch 128, scaled linearly)" if cfg.lr_scaling == "linear" else ""))

    def resume(self, ckpt: dict) -> None:
        """Weights, optimiser, RNG states, history, and this rank's loader where it stood."""
        checkpoint.restore_training(ckpt, self.raw, self.optimizer, self.train_step.scaler)
        checkpoint.set_rng_state(ckpt["rng"][self.ctx.rank])
        try:
            self.train_loader.load_state_dict(ckpt["loader"][self.ctx.rank])
        except ValueError as e:  # e.g. --shards now names a folder sharded anew: other samples, other batches
            raise UsageError(f"--resume: {e}") from None
        self.history, self.step, self.partial = ckpt["history"], ckpt["step"], ckpt["partial"]
        self.log(f"resumed at epoch {self.step // self.spe + 1}, step {self.step}")

    def train_epoch(self, epoch: int) -> dict:
        """The epoch's steps (the rest of them after a resume); its sums stay on the device until the epoch ends."""
        cfg, dev, spe = self.cfg, self.dev, self.spe
        self.train_loader.set_epoch(epoch)  # a check: the loader stands in this epoch (inside it, after a resume)
        if self.partial is None:
            acc = {"loss": torch.zeros((), device=dev), "wait_s": 0.0, "train_s": 0.0,
                   "classes": torch.zeros(self.manifest.num_classes, dtype=torch.long, device=dev)}
        else:  # this epoch's sums so far, from a checkpoint written within it
            acc = {k: v.to(dev) if k in ("loss", "classes") else float(v) for k, v in self.partial.items()}
            self.partial = None
        val_errors = [r["val_top1_err"] for r in self.history]
        t_epoch = t_log = time.perf_counter()
        t_save, n_log, wait_log, loss_log = time.monotonic(), 0, 0.0, torch.zeros((), device=dev)
        for wait, (images, labels) in timed(self.train_loader):
            self.lr = lr_at(cfg.schedule, self.base_lr, self.step, spe, cfg.epochs,
                            warmup_steps=round(cfg.warmup_epochs * spe), val_errors=val_errors)
            set_lr(self.optimizer, self.lr)
            loss = self.train_step(images, labels)
            acc["loss"] += loss
            loss_log += loss
            acc["classes"].index_add_(0, labels.to(dev), torch.ones_like(labels, device=dev))
            acc["wait_s"] += wait
            self.step, n_log, wait_log = self.step + 1, n_log + 1, wait_log + wait
            if self.step % cfg.log_interval and self.step != cfg.max_steps:
                continue
            # The loop's only host syncs: the interval's loss, and whether any rank is due a timed checkpoint.
            due = time.monotonic() - t_save > 60 * cfg.checkpoint_minutes
            stats = all_sum(torch.stack([loss_log, torch.tensor(float(due), device=dev)]), self.ctx).tolist()
            interval_loss, dt = stats[0] / (n_log * self.ctx.world), time.perf_counter() - t_log
            if not math.isfinite(interval_loss):
                raise self.diverged(f"loss is {interval_loss}")
            left = (cfg.epochs * spe - self.step) * dt / n_log
            self.log(f"epoch {epoch + 1}/{cfg.epochs} step {self.step - epoch * spe}/{spe} loss {interval_loss:.4f} "
                     f"lr {self.lr:.3g} {n_log * self.global_batch / dt:,.0f} img/s data-wait {wait_log / dt:.0%} "
                     f"eta {left / 60:.1f} min")
            t_log, n_log, wait_log, loss_log = time.perf_counter(), 0, 0.0, torch.zeros((), device=dev)
            stop = self.step == cfg.max_steps and self.step % spe
            if (stats[1] > 0 or stop) and self.step % spe:
                acc["train_s"] += time.perf_counter() - t_epoch
                t_epoch, t_save = time.perf_counter(), time.monotonic()
                self.save(acc)
            if stop:
                raise self.stopped()
        acc["train_s"] += time.perf_counter() - t_epoch
        return acc

    def end_epoch(self, epoch: int, acc: dict) -> dict:
        """Validation, the epoch's row of metrics.jsonl, its checkpoint (best.pt if best); returns the row."""
        ctx, spe, t_eval = self.ctx, self.spe, time.perf_counter()
        totals = all_sum(torch.cat([acc["loss"].double().view(1), acc["classes"].double()]), ctx)
        ranks = all_gather(torch.tensor([self.step - epoch * spe, int(acc["classes"].sum())], dtype=torch.float64,
                                        device=self.dev), ctx)
        val = evaluate(self.raw, self.val_loader, self.cfg.amp, ctx)
        train_s = acc["train_s"]
        row = {"epoch": epoch + 1, "step": self.step, "train_loss": float(totals[0]) / (spe * ctx.world),
               "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"], "lr": self.lr,
               "img_per_s": spe * self.global_batch / train_s, "data_wait_frac": acc["wait_s"] / train_s,
               "samples_seen": int(totals[1:].sum()), "epoch_s": train_s + time.perf_counter() - t_eval,
               "steps_per_rank": [int(r[0]) for r in ranks], "samples_seen_per_rank": [int(r[1]) for r in ranks]}
        if not math.isfinite(row["train_loss"]):
            raise self.diverged(f"loss is {row['train_loss']}")
        self.history.append(row)
        self.log(f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {row['train_loss']:.4f}, "
                 f"val top-1 error {val['top1_err']:.1%}, top-5 error {val['top5_err']:.1%}, "
                 f"{row['img_per_s']:,.0f} img/s, data-wait {row['data_wait_frac']:.0%}")
        self.save(best=val["top1_err"] <= min(r["val_top1_err"] for r in self.history))
        self.write_metrics()
        return {**row, "samples_seen_per_class": [int(c) for c in totals[1:]], "val_samples": val["samples"]}

    def summary(self, last: dict) -> dict:
        """summary.json: the last epoch's errors, the run's shape and cost, and with --ten-crop its errors too."""
        cfg, m = self.cfg, self.manifest
        s = {"num_classes": m.num_classes, "val_top1_err": last["val_top1_err"], "val_top5_err": last["val_top5_err"],
             "train_loss": last["train_loss"], "chance_top1_err": 1 - 1 / m.num_classes, "world_size": self.ctx.world,
             "global_batch": self.global_batch, "steps_per_epoch": self.spe,
             "samples_seen_per_epoch": last["samples_seen"], "samples_seen_per_rank": last["samples_seen_per_rank"],
             "steps_per_rank": last["steps_per_rank"], "samples_seen_per_class": last["samples_seen_per_class"],
             "train_samples": m.count("train"), "val_samples": last["val_samples"], "epochs": len(self.history),
             "device": cfg.device, "amp": cfg.amp, "wall_s": sum(r["epoch_s"] for r in self.history)}
        if cfg.ten_crop:
            t0 = time.perf_counter()
            with make_loader(cfg, self.ctx, self.manifest, "val", "tencrop", cfg.crop_size) as tencrop:
                ten = evaluate(self.raw, tencrop, cfg.amp, self.ctx, views=10)
            s.update(val_top1_err_10crop=ten["top1_err"], val_top5_err_10crop=ten["top5_err"])
            s["wall_s"] += time.perf_counter() - t0
            self.log(f"ten-crop: val top-1 error {ten['top1_err']:.1%}, top-5 error {ten['top5_err']:.1%}")
        return s

    def save(self, acc: dict | None = None, best: bool = False) -> None:
        """A checkpoint of all a resume needs; `acc`: the sums of the epoch it stops within (None at its end)."""
        if not checkpoint.is_finite(self.raw, self.dev):
            raise self.diverged("the weights are not finite")
        state = {"config": asdict(self.cfg), "world_size": self.ctx.world, "step": self.step, "history": self.history,
                 **checkpoint.training_state(self.raw, self.optimizer, self.train_step.scaler),
                 "rng": checkpoint.every_rank(checkpoint.rng_state(), self.ctx.world),
                 "loader": checkpoint.every_rank(self.train_loader.state_dict(), self.ctx.world),
                 "partial": acc and {k: torch.as_tensor(v).cpu() for k, v in acc.items()}}
        if self.ctx.rank == 0:
            path = checkpoint.save(self.workdir / "checkpoints", state, self.step, self.cfg.keep, best)
            self.log(f"checkpoint {path}")

    def write_metrics(self) -> None:
        from tools.plot_metrics import write_metrics  # imports matplotlib: not for --help or bad input

        if self.ctx.rank == 0:
            write_metrics(self.workdir, self.history)

    def diverged(self, what: str) -> Stop:
        last = checkpoint.step_files(self.workdir / "checkpoints")
        fix = f"Last good checkpoint: {last[0]}; continue from it with --resume --lr LOWER" if last else \
            "No checkpoint was written yet; start again (in a new --workdir) with a lower --lr"
        return Stop(1, f"run.py: {what} at epoch {self.step // self.spe + 1}, step {self.step} (lr {self.lr:.3g}); "
                       f"stopping. {fix}")

    def stopped(self) -> Stop:
        return Stop(0, f"stopped at step {self.step} (--max-steps {self.cfg.max_steps}); continue with --resume")


def train(cfg: Config, ctx: Context, manifest, ckpt: dict | None, log) -> int:
    """The recipe epoch by epoch, from the start or from `ckpt`; WORKDIR gets the metrics and summary.json."""
    t = Trainer(cfg, ctx, manifest, log)
    if ckpt is not None:
        t.resume(ckpt)
    if ctx.rank == 0:
        t.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write(t.workdir / "config.json", json.dumps(asdict(cfg), indent=1).encode())
    t.write_metrics()
    if t.step >= cfg.epochs * t.spe or 0 < cfg.max_steps <= t.step:
        log(f"{t.workdir}: at step {t.step} already; pass a larger --epochs (or --max-steps) to train on")
        return 0
    try:
        for epoch in range(t.step // t.spe, cfg.epochs):
            last = t.end_epoch(epoch, t.train_epoch(epoch))
            if cfg.max_steps and t.step >= cfg.max_steps and epoch + 1 < cfg.epochs:
                raise t.stopped()
    except Stop as stop:
        code, message = stop.args
        log(message, file=sys.stderr if code else sys.stdout)
        return code
    summary = t.summary(last)
    if ctx.rank == 0:
        atomic_write(t.workdir / "summary.json", json.dumps(summary, indent=1).encode())
    t.train_loader.close()
    t.val_loader.close()
    return 0


def evaluate_only(cfg: Config, ctx: Context, manifest, ckpt: dict, log) -> int:
    """--eval CHECKPOINT: centre-crop (and with --ten-crop, ten-crop) error of saved weights on the val split."""
    known = {f.name for f in fields(Config)}  # a checkpoint of an older run.py may hold settings since renamed
    saved = Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    cfg = replace(cfg, divide_std=saved.divide_std)  # the inputs as the weights were trained on
    _, raw = build(Config(**{**asdict(saved), "model_parallel": cfg.model_parallel}), ctx, manifest.num_classes)
    raw.load_state_dict(ckpt["model"])
    result = {"checkpoint": cfg.eval, "step": ckpt["step"], "num_classes": manifest.num_classes}
    for augment, views in [("center", 1)] + [("tencrop", 10)] * cfg.ten_crop:
        with make_loader(cfg, ctx, manifest, "val", augment, saved.crop_size) as loader:
            errs = evaluate(raw, loader, cfg.amp, ctx, views)
        result[augment] = errs
        log(f"{augment}: val top-1 error {errs['top1_err']:.2%}, top-5 error {errs['top5_err']:.2%} "
            f"on {errs['samples']} images")
    log(json.dumps(result))
    return 0


def main(argv=None) -> int:
    t0 = time.perf_counter()
    cfg = parse(argv)
    if cfg.demo and not cfg.shards:
        cfg.shards = str(Path(cfg.workdir) / "shards")
    try:
        ctx = setup(cfg)
        log = print if ctx.rank == 0 else (lambda *a, **k: None)
        if cfg.eval:
            ckpt = checkpoint.read(cfg.eval)
            manifest = load_manifest(cfg.shards or ckpt["config"]["shards"])
        else:
            if not cfg.shards:
                raise UsageError("--shards DIR is required: a folder written by tools/shard_imagenet.py "
                                 "(or try --demo)")
            ckpt = check_workdir(cfg, ctx)
            if cfg.demo:
                make_demo_data(cfg, ctx.rank)
            manifest = load_manifest(cfg.shards)
        log("config:\n" + "\n".join(f"  {k:<19}{v}" for k, v in asdict(cfg).items()))
        if cfg.device == "cuda":
            torch.cuda.set_device(ctx.devices[0])
            torch.backends.cudnn.benchmark = True
        if ctx.world > 1:
            dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        code = (evaluate_only if cfg.eval else train)(cfg, ctx, manifest, ckpt, log)
        if cfg.demo and ctx.rank == 0 and (Path(cfg.workdir) / "summary.json").exists():
            report_demo(cfg, time.perf_counter() - t0)
        return code
    except (UsageError, ShardError, CheckpointError) as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
