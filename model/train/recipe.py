"""The paper's optimisation recipe (§5) as pure functions, and the training step built from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.settings import SEED, above, at_least, option

REFERENCE_BATCH = 128  # §5: the paper's batch; --lr is the rate at this global batch
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # §5
PLATEAU_PATIENCE = 4  # epochs without a new best val error before the /10 (§5 gives the rule, not the number)
PLATEAU_MIN_DELTA = 1e-3  # an improvement smaller than this is "stopped improving"
PLATEAU_MAX_DROPS = 3  # §5: "reduced three times prior to termination"
STEP_EPOCHS = 25  # --schedule step: /10 at epochs 25, 50, 75: three drops in the paper's 90 epochs
SCHEDULES = ("paper", "step", "cosine")
INITS = ("paper", "kaiming")


@torch.no_grad()
def initialise(model: nn.Module, scheme: str) -> None:
    """ "paper" keeps the model's own §5 init; "kaiming" redraws conv/linear weights N(0, 2/fan_in), biases 0."""
    if scheme == "paper":
        return
    if scheme != "kaiming":
        raise ValueError(f"unknown init {scheme!r}; choose from {INITS}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        layer.bias.zero_()
    layers[-1].weight.mul_(0.1)  # small initial logits: the first losses stay near log(classes)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay (§5) on weight matrices and kernels only; biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def sgd(
    model: nn.Module, lr: float = LR, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY
) -> torch.optim.SGD:
    """§5's optimiser: SGD with momentum, weight decay on weights only (param_groups)."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


def scaled_lr(lr: float, global_batch: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """Linear scaling rule (Goyal et al. 2017): the rate grows with the global batch."""
    return lr * global_batch / reference_batch


def plateau_drops(
    val_errors: Sequence[float],
    patience: int = PLATEAU_PATIENCE,
    min_delta: float = PLATEAU_MIN_DELTA,
    max_drops: int = PLATEAU_MAX_DROPS,
) -> int:
    """How many /10 steps the paper's rule (§5) has taken after these per-epoch validation errors."""
    drops, best, stale = 0, math.inf, 0
    for err in val_errors:
        if err < best - min_delta:
            best, stale = err, 0
            continue
        stale += 1
        if stale >= patience and drops < max_drops:
            drops, stale = drops + 1, 0
    return drops


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over the first warmup_steps steps."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def lr_at(
    schedule: str,
    base_lr: float,
    step: int,
    steps_per_epoch: int,
    epochs: int,
    *,
    warmup_steps: int = 0,
    val_errors: Sequence[float] = (),
) -> float:
    """The learning rate of global step `step` (0-based) under one of SCHEDULES."""
    epoch = step // steps_per_epoch
    if schedule == "paper":
        lr = base_lr * 0.1 ** plateau_drops(val_errors[:epoch])
    elif schedule == "step":
        lr = base_lr * 0.1 ** (epoch // STEP_EPOCHS)
    elif schedule == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup_steps)
        t = min(1.0, max(0, step - warmup_steps) / total)
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    return lr * warmup_factor(step, warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def topk_errors(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Count of samples whose label is not among the top-k predictions, per k, as a device tensor (no sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([(~hit[:, :k].any(dim=1)).sum() for k in ks])


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@torch.no_grad()
def count_errors(model: nn.Module, loader, amp: str, views: int, device) -> torch.Tensor:
    """[top-1 misses, top-5 misses, samples] over a loader; with views > 1 the views' softmax is averaged (§4.1)."""
    dtype = AMP_DTYPES[amp]
    model.eval()
    errors, samples = torch.zeros(2, dtype=torch.long, device=device), 0
    for images, labels in loader:
        with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            probs = model(images).float().softmax(1)
        probs = probs.view(-1, views, probs.shape[1]).mean(1).to(device)
        labels = labels.to(device)[:: views if labels.numel() == images.shape[0] else 1]
        errors += topk_errors(probs, labels)
        samples += labels.numel()  # a shape, known on the host: no per-batch host-to-device copy
    model.train()
    return torch.cat([errors, errors.new_full((1,), samples)])


def make_loss(
    model: nn.Module, amp: str = "off", compile: bool | str = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(images, labels): the forward pass under autocast and the cross-entropy, the region torch.compile traces.

    amp is "bf16", "fp16" or "off"; compile is False, True (torch.compile's default mode) or a mode such as
    "reduce-overhead" (CUDA graphs)."""
    dtype = AMP_DTYPES[amp]
    device_type = next(model.parameters()).device.type

    def loss_of(images, labels):
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(images)
        return F.cross_entropy(logits.float(), labels.to(logits.device, non_blocking=True))

    return torch.compile(loss_of, mode=None if compile is True else compile) if compile else loss_of


def make_scaler(model: nn.Module, amp: str) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (it reads found-inf on the host), or None: bf16 and fp32 need none."""
    return torch.amp.GradScaler(next(model.parameters()).device.type) if amp == "fp16" else None


def make_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, amp: str = "off", compile: bool | str = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A step(images, labels) -> detached loss tensor: forward, backward, SGD update, with no host sync (as the
    training loop's step, for benchmarks and tests). It carries `.scaler` (the GradScaler or None)."""
    loss_of, scaler = make_loss(model, amp, compile), make_scaler(model, amp)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(images, labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    step.scaler = scaler
    return step


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class ComputeSettings:
    """Where and how the training step runs"""

    device: str = option("auto", "cuda when there is one", choices=("auto", "cuda", "cpu"))
    amp: str = option("auto", "autocast: bf16 on cuda, off on the cpu", choices=("auto", *AMP_DTYPES))
    compile: str = option(
        "off",
        "torch.compile mode (bare --compile: default; reduce-overhead: CUDA graphs)",
        choices=COMPILE_MODES,
        const="default",
        resumable=True,
    )
    seed: int = option(0, "random seed", check=SEED)

    def resolve_device(self) -> dict:
        """device and amp with "auto" decided for this machine."""
        device = self.device if self.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        return {"device": device, "amp": self.amp if self.amp != "auto" else "bf16" if device == "cuda" else "off"}


@dataclass
class RecipeSettings:
    """The optimisation recipe (§5)"""

    epochs: int = option(90, "passes over the training set (§5: roughly 90)", check=at_least(1), resumable=True)
    lr: float = option(LR, f"learning rate at a global batch of {REFERENCE_BATCH} (§5)", check=above(0), resumable=True)
    lr_scaling: str = option(
        "linear", "linear: the rate grows with the global batch (Goyal et al. 2017)", choices=("linear", "none")
    )
    schedule: str = option("paper", "paper: /10 when val error stops improving (§5); step; cosine", choices=SCHEDULES)
    warmup_epochs: float = option(
        0.0, "linear warm-up (none in the paper; useful for large batches)", check=at_least(0)
    )
    momentum: float = option(MOMENTUM, "SGD momentum (§5)", check=((lambda v: 0 <= v < 1), "at least 0 and below 1"))
    weight_decay: float = option(WEIGHT_DECAY, "on weights, not biases (§5)", check=at_least(0))
    init: str = option("paper", "paper: weights N(0, 0.01), some biases 1 (§5); kaiming: He et al. 2015", choices=INITS)
