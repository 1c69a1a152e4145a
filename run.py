"""Train AlexNet (Krizhevsky, Sutskever & Hinton, 2012) on DALI-read ImageNet shards, and evaluate it.

python run.py --shards DIR --workdir DIR [options]         one GPU (bf16, channels-last), or the CPU
torchrun --nproc-per-node N run.py --shards DIR ...         data parallel (NCCL on GPUs, gloo on CPUs)
python run.py --demo [--workdir DIR]                        synthetic data -> shards -> train -> evaluate
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from model.train import checkpoint
from model.train.build import build, evaluate, make_loader
from model.train.checkpoint import CheckpointError, with_statistics
from model.train.cluster import (
    Context,
    Interrupted,
    Preemption,
    Refused,
    agree,
    another_failed_first,
    init_group,
    process_context,
)
from model.train.config import (
    SAVED_SETTINGS,
    Config,
    UsageError,
    alexnet_refuses,
    demo_preset,
    read_json,
    read_saved,
    refuse_changes,
    saved_settings,
)
from model.train.demo import make_demo_data, report_demo
from model.train.loop import Diverged, Trainer
from model.train.workdir import (
    data_identity,
    other_classes,
    other_data,
    remove_temporaries,
    workdir_lock,
    write_error,
)
from pipeline.atomic import atomic_write
from pipeline.augment import WINDOW_AUGMENTS
from pipeline.cache import local_shards
from pipeline.lock import Busy, FolderLock
from pipeline.manifest import Manifest, ShardError, check_crop, load_manifest
from pipeline.settings import parse as parse_settings
from pipeline.settings import show
from pipeline.store import is_url
from pipeline.threads import default_threads

REFUSALS = (UsageError, ShardError, CheckpointError, Busy)
log = logging.getLogger("run")


def parse(argv=None) -> Config:
    """The settings: declared defaults, the demo's preset with --demo, --config, then the flags; all checked. Folders
    are kept absolute, so that --eval and --config work from anywhere."""
    cfg, _ = parse_settings(
        Config,
        argv,
        prog="run.py",
        description=__doc__,
        preset=demo_preset,
        others=SAVED_SETTINGS,
        check=alexnet_refuses,
    )
    shards = cfg.shards or (str(Path(cfg.workdir) / "shards") if cfg.demo else "")
    return replace(
        cfg,
        **cfg.resolve_device(),
        threads=cfg.threads or default_threads(),
        shards=shards if not shards or is_url(shards) else os.path.abspath(shards),
        workdir=os.path.abspath(cfg.workdir),
    )


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


def load_data(cfg: Config, ctx: Context) -> Manifest:
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


def continue_or_start(cfg: Config, ctx: Context, manifest: Manifest) -> str | None:
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
            refuse_changes(cfg, read_saved(read_json(saved), saved, log.warning), saved)
        return None
    ckpt, path = found
    if isinstance(ckpt.get("loader"), dict):  # one loader state per rank since DALI's own checkpoints hold them
        raise UsageError(
            f"{path} was written by an older run.py, whose loader position this one cannot continue "
            f"exactly; evaluate it with --eval {path}, or train anew in another --workdir"
        )
    refuse_changes(cfg, read_saved(ckpt["config"], path, log.warning), path)
    if ckpt["world_size"] != ctx.world:
        raise UsageError(f"{path} was written by {ckpt['world_size']} processes; continue it with as many")
    what = "data" in ckpt and other_data(ckpt["data"], data_identity(manifest))
    if what:
        raise UsageError(
            f"{path} was trained on {what}; pass the --shards it was trained on "
            f"({ckpt['config']['shards']}), or a new --workdir"
        )
    return str(path)


def train(cfg: Config, ctx: Context, manifest: Manifest, start: str | None, preemption: Preemption) -> int:
    """The recipe epoch by epoch, from step 0 or from the checkpoint `start`; WORKDIR gets metrics and summary.json."""
    ckpt = checkpoint.read(start) if start is not None else {}
    t = Trainer(cfg, ctx, with_statistics(manifest, ckpt.get("statistics")), preemption)
    with t.train_loader, t.val_loader:  # their DALI threads and buffers go on every way out, for a caller's next run
        if start is not None:
            t.resume(ckpt, start)
        if t.done or 0 < cfg.max_steps <= t.state.step:
            log.info(
                f"{t.workdir}: at step {t.state.step} already (epoch {len(t.state.history)}); pass a larger --epochs "
                f"(or --max-steps) to train on"
            )
            return 0
        if start is not None:
            log.info(f"continuing from {start}: epoch {t.state.step // t.spe + 1}, step {t.state.step}")
            was = ckpt["config"].get("epochs", cfg.epochs)
            if cfg.schedule == "cosine" and was != cfg.epochs:
                log.info(
                    f"--epochs {cfg.epochs} (was {was}): the cosine schedule is recomputed over {cfg.epochs} epochs"
                )
        if ctx.rank == 0:  # the settings that train, once a step is about to run
            t.workdir.mkdir(parents=True, exist_ok=True)
            atomic_write(t.workdir / "config.json", json.dumps(saved_settings(cfg), indent=1).encode())
        t.write_metrics()
        try:
            stop = t.fit()
        except Diverged as e:
            log.error(str(e))
            return 1
        if stop:
            return t.stopped(stop)
        if ctx.rank == 0:
            atomic_write(t.workdir / "summary.json", json.dumps(t.summary(), indent=1).encode())
        return 0


def evaluate_only(cfg: Config, ctx: Context) -> int:
    """--eval CHECKPOINT: centre-crop (and with --ten-crop, ten-crop) error of saved weights on the val split, the
    inputs normalised as the weights were trained on (the checkpoint's statistics, not the folder's)."""
    ckpt = checkpoint.read(cfg.eval)
    saved = read_saved(ckpt["config"], Path(cfg.eval), log.warning)
    shards = local_shards(cfg.shards or saved.shards, cfg.cache_dir, log.info)
    manifest = with_statistics(load_manifest(shards), ckpt.get("statistics"))
    check_crop(manifest, "val", saved.crop_size)
    classes = ckpt["data"]["classes"] if "data" in ckpt else [None] * ckpt["model"]["fc8.weight"].shape[0]
    differs = other_classes(
        classes, [c["wnid"] for c in manifest.classes] if "data" in ckpt else [None] * manifest.num_classes
    )
    if differs:
        raise UsageError(f"--eval: {cfg.eval} was trained on {differs}; evaluate it on shards of its own classes")
    cfg = replace(cfg, divide_std=saved.divide_std)  # the inputs as the weights were trained on
    _, raw = build(replace(saved, model_parallel=cfg.model_parallel), ctx, manifest.num_classes)
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


def take(lock: FolderLock, workdir: str) -> None:
    """WORKDIR's lock, or one line: another run holds it (Busy), or the folder cannot be written."""
    try:
        lock.acquire()
    except OSError as e:
        what = "is a file" if Path(workdir).is_file() else f"cannot be written ({e.strerror})"
        raise UsageError(f"--workdir {workdir} {what}; pass a folder you can write to") from None


def said(e: BaseException) -> tuple[str, int] | None:
    """The one line and exit status of a failure run.py reports as such; None for a bug (its traceback shows)."""
    if isinstance(e, REFUSALS):
        return f"run.py: {e}", 2
    if isinstance(e, (Interrupted, KeyboardInterrupt)):  # during start-up: nothing trained yet, nothing to save
        return (
            f"run.py: {e or 'SIGINT'} before the first step ended: stopped; run the same command to start",
            128 + getattr(e, "signum", 2),
        )
    if isinstance(e, OSError) and e.filename is not None:
        return write_error(e), 1
    return None


def lost_a_rank(e: BaseException) -> bool:
    """A collective failed because another rank's process is gone without a word (kill -9, the OOM killer, its
    machine lost): gloo says so in a RuntimeError, NCCL in a DistError."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def main(argv=None) -> int:
    t0 = time.perf_counter()
    cfg = parse(argv)
    lock, preemption, rank = workdir_lock(cfg.workdir), None, int(os.environ.get("RANK", 0))
    store, followed = None, False  # the group's store; whether another rank failed (or vanished) before this one
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
            store = init_group("nccl" if cfg.device == "cuda" else "gloo", ctx)
        if cfg.eval:
            return evaluate_only(cfg, ctx)
        agree(ctx.rank, ctx.world, lambda: take(lock, cfg.workdir), REFUSALS)  # rank 0 holds it till it ends
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
    except Refused:  # rank 0 says why
        return 2
    except (Exception, Interrupted, KeyboardInterrupt) as e:
        line, code = said(e) or (None, 1)
        followed = another_failed_first(store)
        if followed:  # that rank said why; this one's failure follows from it
            return code
        if store is not None and lost_a_rank(e):  # the first to see it: that rank said nothing
            followed = True  # nothing more to wait for from the others: one of them is gone
            line = (
                f"run.py: rank {rank}: another rank of this job ended without a word (killed, out of memory, or its "
                f"machine lost; torchrun's report names it); the checkpoints written are intact: run the same command "
                f"to continue"
            )
        if line is None:
            raise
        if store is not None or rank == 0:  # before the group every rank meets the same refusal: rank 0 says it
            print(line, file=sys.stderr)
        return code
    finally:
        if preemption is not None:
            preemption.close(drain=not followed)
        lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
