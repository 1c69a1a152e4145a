"""run.py's training step compiled in train mode: one whole graph (fullgraph), dropout live, no recompiles from step
to step; on the CPU with AOT autograd's eager backend (seconds), on a GPU with inductor, bf16 and channels-last."""

import pytest
import torch
from torch._dynamo.utils import counters

from model import AlexNet
from model.train.recipe import make_train_step, sgd

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unavailable here")


def compiled_steps(monkeypatch, device, amp, backend, steps=4, batch=4, crop=64):
    """Losses of `steps` steps on one batch with lr 0, so only dropout changes them; make_loss's torch.compile call
    (the region the training loop compiles) is made with fullgraph=True, so any graph break raises."""
    real = torch.compile
    fullgraph = {"fullgraph": True, "backend": backend}
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real(fn, mode=mode, **fullgraph, **kw))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = AlexNet(num_classes=10).to(device, memory_format=torch.channels_last)
    step = make_train_step(model, sgd(model, lr=0.0), amp, compile=True)
    images = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last) * 50
    labels = torch.arange(batch, device=device) % 10
    before = [p.detach().clone() for p in model.parameters()]
    losses = [step(images, labels) for _ in range(steps)]
    assert model.training and all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0: the weights stay
    return torch.stack(losses).float().cpu()


def check(losses):
    assert torch.isfinite(losses).all()
    assert len(set(losses.tolist())) == len(losses)  # train mode: dropout draws anew each step
    # One graph (forward and backward through AOT autograd), compiled at the first step and never again: a guard on
    # the step count, the learning rate or the RNG state would compile one per step.
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1


@pytest.mark.slow  # about a minute of tracing on a 2-core machine
def test_compiled_train_step_is_one_graph_in_train_mode_on_the_cpu(monkeypatch):
    check(compiled_steps(monkeypatch, "cpu", "off", "aot_eager"))


@pytest.mark.gpu
def test_compiled_train_step_is_one_graph_in_train_mode_on_the_gpu(monkeypatch):
    check(compiled_steps(monkeypatch, "cuda", "bf16", "inductor", batch=16, crop=224))
