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
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from model import checkpoint
from model.checkpoint import CheckpointError
from model.recipe import (AMP_DTYPES, INITS, SCHEDULES, count_errors, initialise, lr_at, make_train_step, param_groups,
                          scaled_lr, set_lr)
from pipeline.manifest import ShardError, load_manifest


@dataclass
class Config:
    shards: str = ""  # a folder written by tools/shard_imagenet.py
    workdir: str = "runs/alexnet"
    # §5: the optimisation recipe
    epochs: int = 90  # §5: "roughly 90 cycles through the training set"
    batch_size: int = 128  # §5, per process
    lr: float = 0.01  # §5, for a global batch of 128; scaled linearly with --lr-scaling linear
    lr_scaling: str = "linear"  # linear | none (Goyal et al. 2017, for large global batches)
    schedule: str = "paper"  # §5: /10 when val error stops improving | step | cosine
    warmup_epochs: float = 0.0  # linear warm-up (none in the paper; useful for large batches)
    momentum: float = 0.9  # §5
    weight_decay: float = 5e-4  # §5
    init: str = "paper"  # §5: weights N(0, 0.01), some biases 1 | kaiming (He et al. 2015: learns sooner; the demo)
    # §3, §4: model and data
    towers: int = 2  # §3.5: two towers (groups=2 convs); 1 = the single-GPU variant
    model_parallel: bool = False  # §3.2: the two towers on two GPUs per process
    augment: str = "paper"  # §4.1: random 224 crops, flips, PCA lighting | inception
    crop_size: int = 224  # §3.5
    ten_crop: bool = False  # §4.1: at the end, average the softmax over ten views
    # engineering
    device: str = "auto"  # cuda when there is one
    amp: str = "auto"  # bf16 on cuda, off on cpu | fp16
    compile: str = "off"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    seed: int = 0
    num_threads: int = 4  # DALI CPU threads per process
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
             "ten_crop", "compile", "eval"}


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
    return cfg


# --demo: a small synthetic ImageNet (tools/make_demo_data.py) that trains in minutes; on the CPU the images are
# small (shorter side 72, 64x64 crops) and the recipe is the demo's own (cosine, higher lr), printed like any run.
DEMO_DATA = {"cpu": dict(classes=10, per_class=80, val_per_class=20, size_range=(72, 110), resize="short:72"),
             "cuda": dict(classes=10, per_class=260, val_per_class=50, size_range=(256, 400), resize="short:256")}
DEMO_PRESET = {"cpu": dict(epochs=6, batch_size=32, lr=0.02, lr_scaling="none", schedule="cosine", warmup_epochs=0.5,
                           init="kaiming", crop_size=64, num_threads=1, log_interval=5, keep=1),
               "cuda": dict(epochs=12, batch_size=128, lr=0.02, lr_scaling="none", schedule="cosine", warmup_epochs=0.5,
                            init="kaiming", crop_size=224, log_interval=10, keep=1)}


@dataclass
class Context:
    rank: int
    world: int
    devices: tuple  # one torch.device, or two with --model-parallel


def setup(cfg: Config) -> Context:
    """Rank, world size and this process's devices from torchrun's environment; checked before anything is written."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    per = 2 if cfg.model_parallel else 1
    have = torch.cuda.device_count() if cfg.device == "cuda" else 1
    if cfg.model_parallel and cfg.towers != 2:
        raise UsageError("--model-parallel puts the paper's two towers on two devices: drop --towers 1")
    if cfg.model_parallel and have < 2 * (local + 1):
        raise UsageError(f"--model-parallel needs two {cfg.device} devices per process ({2 * (local + 1)} for local "
                         f"rank {local}); {have} found: drop --model-parallel or run fewer processes per node")
    if cfg.device == "cuda" and have < local + 1:
        raise UsageError(f"local rank {local} has no GPU of its own ({have} found): run at most {have} processes "
                         f"per node")
    devices = tuple(torch.device("cuda", per * local + i) if cfg.device == "cuda" else torch.device("cpu")
                    for i in range(per))
    return Context(rank, world, devices)


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
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and ckpt["config"].get(k) != v]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {ckpt['config'].get(k)}" for k in changed)
        raise UsageError(f"--resume: {path} was trained with {was}; pass the same settings or use a new --workdir")
    if ckpt["world_size"] != ctx.world:
        raise UsageError(f"--resume: {path} was written by {ckpt['world_size']} processes; resume with as many")
    return ckpt


def make_demo_data(cfg: Config, ctx: Context) -> None:
    """Generate and shard the demo set into WORKDIR (once); the other ranks wait for rank 0."""
    from tools import make_demo_data, shard_imagenet

    data = DEMO_DATA[cfg.device]
    if ctx.rank == 0 and not (Path(cfg.shards) / "manifest.json").exists():
        print(f"demo: {data['classes']} synthetic classes, {data['per_class']} train + {data['val_per_class']} val "
              f"images each, resized to {data['resize']}, crops {cfg.crop_size}x{cfg.crop_size} "
              f"(the paper: 1000 classes, 256, 224)")
        src = Path(cfg.workdir) / "images"
        make_demo_data.make_dataset(src, data["classes"], data["per_class"], data["val_per_class"],
                                    size_range=data["size_range"], workers=os.cpu_count() or 1)
        code = shard_imagenet.main(["--src", str(src), "--out", cfg.shards, "--resize", data["resize"]])
        if code:
            raise UsageError(f"demo: tools/shard_imagenet.py failed (exit {code}) on {src}")
    while not (Path(cfg.shards) / "manifest.json").exists():
        time.sleep(1)


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


def make_loader(cfg: Config, ctx: Context, shards: str, split: str, augment: str, crop_size: int):
    from pipeline import DaliLoader

    dev = ctx.devices[0]
    return DaliLoader(shards, split, cfg.batch_size, augment=augment, crop_size=crop_size, device=dev.type,
                      device_id=dev.index if dev.type == "cuda" else None, rank=ctx.rank, world_size=ctx.world,
                      seed=cfg.seed, num_threads=cfg.num_threads,
                      dtype=AMP_DTYPES[cfg.amp] or torch.float32)


def all_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(t)
    return t


def evaluate(model, loader, amp: str, ctx: Context, views: int = 1) -> dict:
    """Top-1/top-5 error on val, every rank's share counted once; views=10 averages ten crops' softmax (§4.1)."""
    top1, top5, n = all_sum(count_errors(model, loader, amp, views, ctx.devices[0]), ctx).tolist()
    return {"top1_err": top1 / max(n, 1), "top5_err": top5 / max(n, 1), "samples": n}


def rng_states(ctx: Context) -> list:
    """Every rank's torch RNG states (dropout masks), gathered so that rank 0's checkpoint holds them all."""
    every = [checkpoint.rng_state()] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(every, every[0])
    return every


def train(cfg: Config, ctx: Context, manifest, ckpt: dict | None, log) -> int:
    torch.manual_seed(cfg.seed + ctx.rank)
    model, raw = build(cfg, ctx, manifest.num_classes)
    optimizer = torch.optim.SGD(param_groups(raw, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    step_fn = make_train_step(model, optimizer, cfg.amp, compile=False if cfg.compile == "off" else cfg.compile)
    train_loader = make_loader(cfg, ctx, cfg.shards, "train", cfg.augment, cfg.crop_size)
    val_loader = make_loader(cfg, ctx, cfg.shards, "val", "center", cfg.crop_size)
    spe, global_batch, dev = len(train_loader), cfg.batch_size * ctx.world, ctx.devices[0]
    base_lr = scaled_lr(cfg.lr, global_batch) if cfg.lr_scaling == "linear" else cfg.lr
    warmup = round(cfg.warmup_epochs * spe)
    log(f"{manifest.count('train')} train images, {manifest.num_classes} classes; {ctx.world} process(es) x batch "
        f"{cfg.batch_size} = {global_batch}, {spe} steps per epoch; lr {base_lr:g}"
        + (f" ({cfg.lr} at batch 128, scaled linearly)" if cfg.lr_scaling == "linear" else ""))
    workdir, history, step, partial = Path(cfg.workdir), [], 0, None
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if step_fn.scaler is not None:
            step_fn.scaler.load_state_dict(ckpt["scaler"])
        history, step, partial = ckpt["history"], ckpt["step"], ckpt["partial"]
        checkpoint.set_rng_state(ckpt["rng"][ctx.rank])
        if partial is not None:
            train_loader.load_state_dict(ckpt["loader"])
        log(f"resumed at epoch {step // spe + 1}, step {step}")
    if ctx.rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(workdir / "config.json", json.dumps(asdict(cfg), indent=1).encode())
        write_metrics(workdir, history)

    def save(acc=None, best=False):
        if not torch.stack([p.detach().float().sum().to(dev) for p in raw.parameters()]).sum().isfinite():
            return False
        state = {"config": asdict(cfg), "world_size": ctx.world, "step": step, "history": history,
                 "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_states(ctx),
                 "scaler": step_fn.scaler.state_dict() if step_fn.scaler else None,
                 "loader": train_loader.state_dict(),
                 "partial": acc and {k: torch.as_tensor(v).cpu() for k, v in acc.items()}}
        if ctx.rank == 0:
            log(f"checkpoint {checkpoint.save(workdir / 'checkpoints', state, step, cfg.keep, best)}")
        return True

    def diverged(what):
        last = checkpoint.step_files(workdir / "checkpoints")
        fix = f"Last good checkpoint: {last[0]}; continue from it with --resume --lr LOWER" if last else \
            "No checkpoint was written yet; start again (in a new --workdir) with a lower --lr"
        log(f"run.py: {what} at epoch {step // spe + 1}, step {step} (lr {lr:.3g}); stopping. {fix}", file=sys.stderr)
        return 1

    if step >= cfg.epochs * spe or 0 < cfg.max_steps <= step:
        log(f"{workdir}: at step {step} already; pass a larger --epochs (or --max-steps) to train on")
        return 0
    for epoch in range(step // spe, cfg.epochs):
        if partial is None:
            train_loader.set_epoch(epoch)
            acc = {"loss": torch.zeros((), device=dev), "wait_s": 0.0, "train_s": 0.0,
                   "classes": torch.zeros(manifest.num_classes, dtype=torch.long, device=dev)}
        else:  # this epoch's sums so far, from a checkpoint written within it
            acc = {k: v.to(dev) if k in ("loss", "classes") else float(v) for k, v in partial.items()}
            partial = None
        val_errors = [r["val_top1_err"] for r in history]
        t_epoch = t_log = time.perf_counter()
        t_save, n_log, wait_log, loss_log = time.monotonic(), 0, 0.0, torch.zeros((), device=dev)
        loader = iter(train_loader)
        while True:
            t0 = time.perf_counter()
            batch = next(loader, None)
            wait = time.perf_counter() - t0
            if batch is None:
                break
            images, labels = batch
            lr = lr_at(cfg.schedule, base_lr, step, spe, cfg.epochs, warmup_steps=warmup, val_errors=val_errors)
            set_lr(optimizer, lr)
            loss = step_fn(images, labels)
            acc["loss"] += loss
            loss_log += loss
            acc["classes"].index_add_(0, labels.to(dev), torch.ones_like(labels, device=dev))
            acc["wait_s"] += wait
            step, n_log, wait_log = step + 1, n_log + 1, wait_log + wait
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                due = time.monotonic() - t_save > 60 * cfg.checkpoint_minutes
                stats = all_sum(torch.stack([loss_log, torch.tensor(float(due), device=dev)]), ctx).tolist()
                interval_loss, dt = stats[0] / (n_log * ctx.world), time.perf_counter() - t_log
                if not math.isfinite(interval_loss):
                    return diverged(f"loss is {interval_loss}")
                left = (cfg.epochs * spe - step) * dt / n_log
                log(f"epoch {epoch + 1}/{cfg.epochs} step {step - epoch * spe}/{spe} loss {interval_loss:.4f} "
                    f"lr {lr:.3g} {n_log * global_batch / dt:,.0f} img/s data-wait {wait_log / dt:.0%} "
                    f"eta {left / 60:.1f} min")
                t_log, n_log, wait_log, loss_log = time.perf_counter(), 0, 0.0, torch.zeros((), device=dev)
                stop = step == cfg.max_steps and step % spe
                if (stats[1] > 0 or stop) and step % spe:
                    acc["train_s"] += time.perf_counter() - t_epoch
                    t_epoch, t_save = time.perf_counter(), time.monotonic()
                    if not save(acc):
                        return diverged("the weights are not finite")
                if stop:
                    log(f"stopped at step {step} (--max-steps {cfg.max_steps}); continue with --resume")
                    return 0
        acc["train_s"] += time.perf_counter() - t_epoch
        t_eval = time.perf_counter()
        totals = all_sum(torch.cat([acc["loss"].double().view(1), acc["classes"].double()]), ctx)
        per_rank = torch.tensor([step - epoch * spe, int(acc["classes"].sum())], dtype=torch.float64, device=dev)
        ranks = [torch.zeros_like(per_rank) for _ in range(ctx.world)]
        if ctx.world > 1:
            dist.all_gather(ranks, per_rank)
        else:
            ranks = [per_rank]
        val = evaluate(raw, val_loader, cfg.amp, ctx)
        train_s = acc["train_s"]
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(totals[0]) / (spe * ctx.world),
               "val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"], "lr": lr,
               "img_per_s": spe * global_batch / train_s, "data_wait_frac": acc["wait_s"] / train_s,
               "samples_seen": int(totals[1:].sum()), "epoch_s": train_s + time.perf_counter() - t_eval,
               "steps_per_rank": [int(r[0]) for r in ranks], "samples_seen_per_rank": [int(r[1]) for r in ranks]}
        if not math.isfinite(row["train_loss"]):
            return diverged(f"loss is {row['train_loss']}")
        history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
            f"val top-1 error {val['top1_err']:.1%}, top-5 error {val['top5_err']:.1%}, "
            f"{row['img_per_s']:,.0f} img/s, data-wait {row['data_wait_frac']:.0%}")
        if not save(best=val["top1_err"] <= min(r["val_top1_err"] for r in history)):
            return diverged("the weights are not finite")
        if ctx.rank == 0:
            write_metrics(workdir, history)
        if cfg.max_steps and step >= cfg.max_steps and epoch + 1 < cfg.epochs:
            log(f"stopped at step {step} (--max-steps {cfg.max_steps}); continue with --resume")
            return 0
    summary = {"num_classes": manifest.num_classes, "val_top1_err": history[-1]["val_top1_err"],
               "val_top5_err": history[-1]["val_top5_err"], "train_loss": history[-1]["train_loss"],
               "chance_top1_err": 1 - 1 / manifest.num_classes, "world_size": ctx.world, "global_batch": global_batch,
               "steps_per_epoch": spe, "samples_seen_per_epoch": history[-1]["samples_seen"],
               "samples_seen_per_rank": history[-1]["samples_seen_per_rank"],
               "steps_per_rank": history[-1]["steps_per_rank"],
               "samples_seen_per_class": [int(c) for c in totals[1:]], "train_samples": manifest.count("train"),
               "val_samples": val["samples"], "epochs": len(history), "device": cfg.device, "amp": cfg.amp,
               "wall_s": sum(r["epoch_s"] for r in history)}
    if cfg.ten_crop:
        t0 = time.perf_counter()
        with make_loader(cfg, ctx, cfg.shards, "val", "tencrop", cfg.crop_size) as tencrop:
            ten = evaluate(raw, tencrop, cfg.amp, ctx, views=10)
        summary.update(val_top1_err_10crop=ten["top1_err"], val_top5_err_10crop=ten["top5_err"])
        summary["wall_s"] += time.perf_counter() - t0
        log(f"ten-crop: val top-1 error {ten['top1_err']:.1%}, top-5 error {ten['top5_err']:.1%}")
    if ctx.rank == 0:
        checkpoint.write_atomic(workdir / "summary.json", json.dumps(summary, indent=1).encode())
    train_loader.close()
    val_loader.close()
    return 0


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """WORKDIR/metrics.jsonl (one line per epoch) and metrics.png, rewritten whole so a resume drops stale epochs."""
    from tools.plot_metrics import plot

    checkpoint.write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    if history:
        plot(history, workdir / "metrics.png", title=str(workdir))


def evaluate_only(cfg: Config, ctx: Context, manifest, ckpt: dict, log) -> int:
    """--eval CHECKPOINT: centre-crop (and with --ten-crop, ten-crop) error of saved weights on the val split."""
    saved = Config(**ckpt["config"])
    _, raw = build(Config(**{**asdict(saved), "model_parallel": cfg.model_parallel}), ctx, manifest.num_classes)
    raw.load_state_dict(ckpt["model"])
    result = {"checkpoint": cfg.eval, "step": ckpt["step"], "num_classes": manifest.num_classes}
    for augment, views in [("center", 1)] + [("tencrop", 10)] * cfg.ten_crop:
        with make_loader(cfg, ctx, str(manifest.root), "val", augment, saved.crop_size) as loader:
            errs = evaluate(raw, loader, cfg.amp, ctx, views)
        result[augment] = errs
        log(f"{augment}: val top-1 error {errs['top1_err']:.2%}, top-5 error {errs['top5_err']:.2%} "
            f"on {errs['samples']} images")
    log(json.dumps(result))
    return 0


def report_demo(cfg: Config, wall_s: float) -> None:
    s, data = json.loads((Path(cfg.workdir) / "summary.json").read_text()), DEMO_DATA[cfg.device]
    print(f"\ndemo: in {wall_s:.0f} s ({cfg.device}), AlexNet learned {s['num_classes']} synthetic classes from "
          f"{s['train_samples']} images ({cfg.crop_size}x{cfg.crop_size} crops): on {s['val_samples']} held-out images "
          f"top-1 error {s['val_top1_err']:.1%} (chance {s['chance_top1_err']:.0%}), "
          f"top-5 error {s['val_top5_err']:.1%}.")
    print(f"demo: curves in {cfg.workdir}/metrics.png, per-epoch numbers in metrics.jsonl, "
          f"weights in checkpoints/best.pt")


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
                make_demo_data(cfg, ctx)
            manifest = load_manifest(cfg.shards)
    except (UsageError, ShardError, CheckpointError) as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    log("config:\n" + "\n".join(f"  {k:<19}{v}" for k, v in asdict(cfg).items()))
    if cfg.device == "cuda":
        torch.cuda.set_device(ctx.devices[0])
        torch.backends.cudnn.benchmark = True
    if ctx.world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    try:
        code = (evaluate_only if cfg.eval else train)(cfg, ctx, manifest, ckpt, log)
        if cfg.demo and ctx.rank == 0 and (Path(cfg.workdir) / "summary.json").exists():
            report_demo(cfg, time.perf_counter() - t0)
        return code
    except (UsageError, ShardError, CheckpointError) as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
