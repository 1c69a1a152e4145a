"""Train AlexNet (Krizhevsky, Sutskever & Hinton, 2012) on DALI-read ImageNet shards, and evaluate it.

python run.py --shards DIR --workdir DIR [options]         one GPU (bf16, channels-last), or the CPU
torchrun --nproc-per-node N run.py --shards DIR ...         data parallel (NCCL on GPUs, gloo on CPUs)
python run.py --demo [--workdir DIR]                        synthetic data -> shards -> train -> evaluate
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from model.train import checkpoint
from model.train.checkpoint import CheckpointError
from model.train.cluster import Context, Interrupted, Preemption, Refused, agree, init_group, process_context
from model.train.config import Config, UsageError, demo_preset, refuse_changes
from model.train.demo import make_demo_data, report_demo
from model.train.loop import Diverged, Trainer, build, evaluate, make_loader
from model.train.workdir import WorkdirBusy, WorkdirLock, data_identity, other_classes, other_data, remove_temporaries
from pipeline.atomic import atomic_write
from pipeline.augment import WINDOW_AUGMENTS
from pipeline.cache import local_shards
from pipeline.manifest import ShardError, check_crop, load_manifest
from pipeline.settings import parse as parse_settings
from pipeline.settings import show
from pipeline.threads import default_threads

REFUSALS = (UsageError, ShardError, CheckpointError, WorkdirBusy)
log = logging.getLogger("run")


def parse(argv=None) -> Config:
    """The settings: declared defaults, the demo's preset with --demo, --config, then the flags; all checked."""
    cfg, _ = parse_settings(Config, argv, prog="run.py", description=__doc__, preset=demo_preset)
    return replace(cfg, **cfg.resolve_device(), threads=cfg.threads or default_threads())


def setup(cfg: Config) -> Context:
    """This process's place from torchrun's environment, checked before anything is written."""
    try:
        return process_context(cfg.device, cfg.model_parallel, cfg.towers)
    except ValueError as e:
        raise UsageError(str(e)) from None


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
    manifest = load_manifest(local_shards(cfg.shards, cfg.cache_dir, log.info))  # a bucket: its local copy
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
    manifest = load_manifest(local_shards(cfg.shards or ckpt["config"]["shards"], cfg.cache_dir, log.info))
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
        agree(ctx.rank, ctx.world, lock.acquire, REFUSALS)  # rank 0 holds WORKDIR/run.lock until this process ends
        if cfg.demo:
            agree(ctx.rank, ctx.world, lambda: make_demo_data(cfg), REFUSALS)
            manifest = load_data(cfg, ctx)
        # From here on SIGTERM and SIGINT stop the run after a step. Not before the demo's data: its pool's workers
        # would inherit the handler, take the pool's SIGTERM for a request to stop later, and never end.
        preemption = Preemption(ctx.world)
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
    except (Interrupted, KeyboardInterrupt) as e:  # during start-up: nothing trained yet, nothing to save
        print(
            f"run.py: {e or 'SIGINT'} before the first step ended: stopped; run the same command to start",
            file=sys.stderr,
        )
        return 128 + getattr(e, "signum", 2)
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
