"""The §5 recipe: parameter groups, LR schedules as formulas, top-k errors, and a sync-free train step that learns."""

import math

import pytest
import torch
from torch import nn

from model.train.recipe import (
    count_errors,
    initialise,
    lr_at,
    make_train_step,
    param_groups,
    plateau_drops,
    scaled_lr,
    topk_errors,
    warmup_factor,
)


def test_param_groups_decay_weights_not_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    decay, rest = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in rest["params"]} == {id(model[0].bias), id(model[3].bias)}


def test_linear_scaling_rule():
    assert scaled_lr(0.01, 128) == pytest.approx(0.01)
    assert scaled_lr(0.01, 1024) == pytest.approx(0.08)
    assert scaled_lr(0.01, 64) == pytest.approx(0.005)


def test_plateau_rule_divides_when_val_error_stops_improving():
    assert plateau_drops([0.9, 0.8, 0.7, 0.6]) == 0
    assert plateau_drops([0.9, 0.8, 0.8, 0.8, 0.8]) == 0  # 3 stale epochs: patience 4 not reached
    assert plateau_drops([0.9, 0.8, 0.8, 0.8, 0.8, 0.8]) == 1
    assert plateau_drops([0.9, 0.8] + [0.8] * 8) == 2  # the counter restarts after a drop
    assert plateau_drops([0.5] * 100) == 3  # §5: three reductions in all
    assert plateau_drops([0.9, 0.8, 0.8, 0.8, 0.7995, 0.8, 0.8], min_delta=1e-3) == 1  # a tiny gain is no gain


def test_paper_schedule_uses_only_finished_epochs():
    errs = [0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    # the drop decided by epoch 5's error (index 5) applies from epoch 6 on
    assert lr_at("paper", 0.01, 6 * 10 - 1, 10, 90, val_errors=errs) == pytest.approx(0.01)
    assert lr_at("paper", 0.01, 6 * 10, 10, 90, val_errors=errs) == pytest.approx(0.001)


def test_step_schedule():
    assert lr_at("step", 0.01, 24 * 100 + 99, 100, 90) == pytest.approx(0.01)
    assert lr_at("step", 0.01, 25 * 100, 100, 90) == pytest.approx(0.001)
    assert lr_at("step", 0.01, 89 * 100, 100, 90) == pytest.approx(1e-5)  # §5: three drops in 90 epochs


def test_cosine_schedule_and_warmup():
    assert lr_at("cosine", 0.1, 0, 10, 10) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 50, 10, 10) == pytest.approx(0.05)
    assert lr_at("cosine", 0.1, 100, 10, 10) == pytest.approx(0.0, abs=1e-12)
    # warm-up: linear ramp over 20 steps, then the cosine starts from its top
    assert warmup_factor(0, 20) == pytest.approx(1 / 20) and warmup_factor(19, 20) == 1.0 and warmup_factor(5, 0) == 1.0
    assert lr_at("cosine", 0.1, 9, 10, 10, warmup_steps=20) == pytest.approx(0.1 * 10 / 20)
    assert lr_at("cosine", 0.1, 20, 10, 10, warmup_steps=20) == pytest.approx(0.1)
    t = (60 - 20) / (100 - 20)
    assert lr_at("cosine", 0.1, 60, 10, 10, warmup_steps=20) == pytest.approx(0.05 * (1 + math.cos(math.pi * t)))
    with pytest.raises(ValueError):
        lr_at("linear", 0.1, 0, 10, 10)


def test_topk_errors_counts():
    logits = torch.tensor(
        [
            [0.0, 1, 2, 3, 4, 5, 6],  # label 6: top-1 hit
            [6.0, 5, 4, 3, 2, 1, 0],  # label 4: rank 5, top-5 hit, top-1 miss
            [6.0, 5, 4, 3, 2, 1, 0],
        ]
    )  # label 6: rank 7, miss both
    assert topk_errors(logits, torch.tensor([6, 4, 6])).tolist() == [2, 1]


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 3),
    ).to(memory_format=torch.channels_last)


def test_train_step_matches_a_hand_written_sgd_step():
    model, ref = _tiny(), _tiny()
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    step = make_train_step(model, torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9), "off")
    torch.manual_seed(1)
    loss = step(x, y)
    torch.manual_seed(1)  # same dropout mask
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * (p.grad + (5e-4 * p if p.ndim > 1 else 0))  # first momentum step: v = g + wd * w
    assert not loss.requires_grad and loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert step.scaler is None


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_train_step_learns(amp):
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g)
    y = torch.arange(24) % 3
    x[:, 0] += 2.0 * (y[:, None, None] - 1)  # class signal in the red channel
    step = make_train_step(model, torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9), amp)
    losses = [step(x, y) for _ in range(40)]
    assert losses[-1].item() < 0.5 * losses[0].item()


def test_ten_crop_averages_softmax_over_views():
    # Sample 0 (label 1): 6 views lean weakly to class 0, 4 views are sure of class 1; the softmax mean picks 1,
    # where a majority vote would pick 0. Sample 1 (label 2): every view says class 3 and ranks 2 last.
    weak, sure = torch.tensor([1.0, 0.0, 0, 0, 0, 0]), torch.tensor([0.0, 20.0, 0, 0, 0, 0])
    views = torch.stack([weak] * 6 + [sure] * 4 + [torch.tensor([0.0, 0, -5, 5, 0, 0])] * 10)
    loader = [(views, torch.tensor([1, 2]))]
    assert count_errors(nn.Identity(), loader, "off", 10, "cpu").tolist() == [1, 1, 2]
    assert count_errors(nn.Identity(), [(views, torch.arange(20) % 6)], "off", 1, "cpu")[2] == 20


def test_initialise_kaiming_and_paper():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 256, 3), nn.Flatten(), nn.Linear(1024, 512), nn.Linear(512, 10))
    before = [p.clone() for p in model.parameters()]
    initialise(model, "paper")  # the model's own init is the paper's: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    initialise(model, "kaiming")
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert model[2].weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.05)
    assert model[3].weight.std().item() == pytest.approx(0.1 * math.sqrt(2 / 512), rel=0.1)
    assert all(not layer.bias.any() for layer in (model[0], model[2], model[3]))


def test_evaluation_does_not_sync_per_batch_and_counts_as_numpy_does(device):
    """Counting errors queues work only (on a GPU, CUDA's sync debug mode raises on any host synchronisation), and
    the counts are the ones the scores give when ranked on the host."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6)).to(device)
    batches = [(torch.randn(8, 3, 2, 2, device=device), torch.randint(0, 6, (8,), device=device)) for _ in range(3)]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        counts = count_errors(model, batches, "bf16", 1, torch.device(device))
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    want = [0, 0, 24]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        for images, labels in batches:
            ranked = model(images).float().argsort(1, descending=True).cpu()
            for row, label in zip(ranked.tolist(), labels.tolist()):
                want[0] += label != row[0]
                want[1] += label not in row[:5]
    assert counts.tolist() == want and 0 < want[0] < 24
