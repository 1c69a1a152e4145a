"""ModelParallelAlexNet (§3.2): the same network and checkpoints as AlexNet(towers=2), towers on two devices."""

import pytest
import torch

from model import AlexNet, ModelParallelAlexNet


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    single = AlexNet(num_classes=10)
    parallel = ModelParallelAlexNet(("cpu", "cpu"), num_classes=10)
    parallel.load_state_dict(single.state_dict())
    return single, parallel


def grads_after_step(net, x, labels, seed):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = net(x)
    torch.nn.functional.cross_entropy(out, labels).backward()
    return out.detach().cpu(), {n: p.grad.cpu() for n, p in net.named_parameters()}


def assert_same_step(single, parallel, x, labels, device0="cpu"):
    out_s, grads_s = grads_after_step(single, x, labels, seed=3)
    out_p, grads_p = grads_after_step(parallel, x.to(device0), labels.to(device0), seed=3)
    torch.testing.assert_close(out_p, out_s, rtol=1e-5, atol=1e-5)
    assert grads_p.keys() == grads_s.keys()
    for name in grads_s:
        scale = grads_s[name].abs().max().item()
        assert scale > 0, name  # every layer is reached by the loss
        torch.testing.assert_close(grads_p[name], grads_s[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    return out_s


@pytest.mark.slow
def test_state_dicts_are_interchangeable(pair):
    single, parallel = pair
    assert {k: v.shape for k, v in single.state_dict().items()} == {
        k: v.shape for k, v in parallel.state_dict().items()
    }
    fresh = AlexNet(num_classes=10)
    fresh.load_state_dict(parallel.state_dict())
    for (name, a), b in zip(fresh.state_dict().items(), single.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_outputs_and_gradients_equal_in_eval(pair):
    single, parallel = pair
    single.eval(), parallel.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_same_step(single, parallel, x, torch.tensor([1, 7]))


@pytest.mark.slow
def test_outputs_and_gradients_equal_with_dropout(pair):
    """Both draw their dropout masks from the same generator in the same order, so training mode compares too."""
    single, parallel = pair
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    single.eval()
    with torch.no_grad():
        evaluated = single(x)
    single.train(), parallel.train()
    try:
        trained = assert_same_step(single, parallel, x, torch.tensor([0, 9]))
    finally:
        single.eval(), parallel.eval()
    assert not torch.allclose(trained, evaluated)  # dropout was active


def test_needs_two_devices():
    with pytest.raises(ValueError, match="two devices"):
        ModelParallelAlexNet(("cpu",), num_classes=10)


@pytest.mark.parametrize(
    "devices",
    [
        pytest.param(("cpu", "cpu"), marks=pytest.mark.slow),  # seconds: a whole step of two 60M-weight models
        pytest.param(("cuda:0", "cuda:0"), marks=pytest.mark.gpu),
        pytest.param(("cuda:0", "cuda:1"), marks=pytest.mark.gpu),
    ],
)
def test_towers_match_single_device(devices, monkeypatch):
    if devices[0] != "cpu" and torch.cuda.device_count() < len(set(devices)):
        pytest.skip(f"needs {len(set(devices))} GPUs")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    single = AlexNet(num_classes=10).to(devices[0]).eval()
    parallel = ModelParallelAlexNet(devices, num_classes=10).eval()
    parallel.load_state_dict(single.state_dict())
    assert parallel.conv2[1].weight.device == torch.device(devices[1])
    assert parallel.fc6.weight.device == torch.device(devices[0])
    size = 64 if devices[0] == "cpu" else 224  # the smallest the poolings take: a second on 2 cores
    x = torch.randn(4, 3, size, size, device=devices[0]).contiguous(memory_format=torch.channels_last)
    assert_same_step(single, parallel, x, torch.tensor([1, 2, 3, 4], device=devices[0]), device0=devices[0])
