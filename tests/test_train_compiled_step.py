"""run.py's training step compiled in train mode: one whole graph (fullgraph), dropout live, no recompiles from step
to step, the losses and gradients eager's; on the CPU with AOT autograd's eager backend (seconds), on a GPU with
inductor, bf16 and channels-last."""

import pytest
import torch
from torch._dynamo.utils import counters

from model import AlexNet
from model.train.recipe import make_train_step, sgd

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unavailable here")


def fullgraph(monkeypatch, backend):
    """make_train_step's own torch.compile call made with fullgraph=True, so that any graph break raises."""
    real = torch.compile
    fullgraph = {"fullgraph": True, "backend": backend}
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real(fn, mode=mode, **fullgraph, **kw))
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)


def compiled_steps(device, amp, steps=4, batch=4, crop=64, compile=True):
    """Losses of `steps` steps on one batch with lr 0, so only dropout changes them, and the last step's gradients;
    inductor draws dropout's masks from torch's generator (fallback_random), so an eager run from the same seed
    draws the same."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = AlexNet(num_classes=10).to(device, memory_format=torch.channels_last)
    step = make_train_step(model, sgd(model, lr=0.0), amp, compile=compile)
    images = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last) * 50
    labels = torch.arange(batch, device=device) % 10
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    losses = [step(images, labels) for _ in range(steps)]
    assert model.training and all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0: the weights stay
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()]).cpu()
    return torch.stack(losses).float().cpu(), grads


def check(steps, eager, rtol):
    """One graph; and the compiled step's losses and gradients are eager's, the same dropout masks drawn."""
    losses, grads = steps
    torch.testing.assert_close(losses, eager[0], rtol=rtol, atol=0)
    assert torch.nn.functional.cosine_similarity(grads, eager[1], dim=0) > 1 - rtol
    assert torch.isfinite(losses).all()
    assert len(set(losses.tolist())) == len(losses)  # train mode: dropout draws anew each step
    # One graph (forward and backward through AOT autograd), compiled at the first step and never again: a guard on
    # the step count, the learning rate or the RNG state would compile one per step.
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1


@pytest.mark.slow  # about a minute of tracing on a 2-core machine
def test_compiled_train_step_is_one_graph_in_train_mode(monkeypatch, device):
    """On the CPU AOT autograd's eager backend (seconds), fp32; on a GPU inductor, bf16, channels-last, where fused
    kernels round otherwise than eager's (a provisional 1 %)."""
    fullgraph(monkeypatch, "aot_eager" if device == "cpu" else "inductor")
    kw = {"amp": "off"} if device == "cpu" else {"amp": "bf16", "batch": 16, "crop": 224}
    eager = compiled_steps(device, **kw, compile=False)
    check(compiled_steps(device, **kw), eager, rtol=1e-5 if device == "cpu" else 1e-2)
