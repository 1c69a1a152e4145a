"""LRN (§3.3): the reference and the fast path against an independent NumPy formula, and the fast backward."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import lrn
from model.lrn import fast_local_response_norm, local_response_norm


def numpy_lrn(a, n=5, alpha=1e-4, beta=0.75, k=2.0):
    """b[:, i] = a[:, i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[:, j]^2) ** beta, element by element."""
    out = np.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        s = np.zeros_like(a[:, 0])
        for j in range(max(0, i - n // 2), min(channels - 1, i + n // 2) + 1):
            s += a[:, j] ** 2
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


def activations(shape, seed=0, scale=60.0, dtype=torch.float64):
    """Large enough that alpha * sum(a^2) is of order k, so the normalisation really bites."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale).abs()


@pytest.mark.parametrize("hyper", [(5, 1e-4, 0.75, 2.0), (3, 2e-3, 0.5, 1.0)])
def test_reference_and_fast_match_numpy_formula(hyper):
    x = activations((2, 11, 4, 3))
    expect = numpy_lrn(x.numpy(), *hyper)
    assert np.abs(expect - x.numpy()).max() > 1.0  # the normalisation changes the values
    np.testing.assert_allclose(local_response_norm(x, *hyper).numpy(), expect, rtol=1e-13, atol=0)
    np.testing.assert_allclose(fast_local_response_norm(x, *hyper).numpy(), expect, rtol=1e-13, atol=0)


def test_alpha_is_not_divided_by_n():
    x = activations((1, 9, 3, 3))
    paper = fast_local_response_norm(x)
    # torch's LRN averages over the window: its alpha must be n times the paper's to agree.
    torch.testing.assert_close(paper, F.local_response_norm(x, 5, alpha=5 * 1e-4, beta=0.75, k=2.0))
    assert (paper - F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=2.0)).abs().max() > 1e-2


def test_groups_keep_windows_inside_each_tower():
    x = activations((2, 12, 3, 3), seed=1)
    halves = np.concatenate([numpy_lrn(h.numpy()) for h in x.chunk(2, 1)], 1)
    np.testing.assert_allclose(fast_local_response_norm(x, groups=2).numpy(), halves, rtol=1e-13, atol=0)
    assert np.abs(fast_local_response_norm(x).numpy() - halves).max() > 1e-3


@pytest.mark.parametrize("groups", [1, 2])
def test_fast_backward_gradcheck(groups):
    x = activations((2, 8, 3, 2), seed=2, scale=40.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fast_local_response_norm(t, groups=groups), (x,))


def test_fast_backward_matches_autograd_of_reference():
    x = activations((2, 10, 4, 4), seed=3)
    g = torch.randn_like(x)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    fast_local_response_norm(a).backward(g)
    local_response_norm(b).backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_channels_last_and_low_precision_are_kept():
    x = activations((2, 16, 5, 5), seed=4, dtype=torch.float32).to(memory_format=torch.channels_last)
    xb = x.bfloat16().requires_grad_()
    y = fast_local_response_norm(xb, groups=2)
    y.backward(torch.ones_like(y))
    assert y.dtype == xb.grad.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert xb.grad.is_contiguous(memory_format=torch.channels_last)
    # Computed in fp32 inside: only the final rounding to bf16 separates it from the fp64 formula.
    expect = torch.cat([local_response_norm(h) for h in xb.detach().double().chunk(2, 1)], 1)
    torch.testing.assert_close(y.double(), expect, rtol=2**-8, atol=0)


def test_even_window_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        fast_local_response_norm(torch.ones(1, 4, 2, 2), size=4)


@pytest.mark.slow
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unavailable here")
def test_traces_whole_through_aot_autograd():
    compiled = torch.compile(lambda t: fast_local_response_norm(t, groups=2), backend="aot_eager", fullgraph=True)
    x = activations((1, 8, 3, 3), seed=5).requires_grad_()
    y = x.detach().clone().requires_grad_()
    compiled(x).sum().backward()
    fast_local_response_norm(y, groups=2).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unavailable here")
def test_fused_kernels_are_static_but_for_the_batch():
    """One kernel per layer shape, whatever the batch: fully static would compile 5 graphs here, the default's
    automatic dynamic shapes 3 (the last generic in the channels too), fully dynamic 1."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    forward, _ = lrn._fused()
    for batch, channels in ((2, 8), (3, 8), (4, 8), (2, 16), (5, 16)):
        x = activations((batch, channels, 5, 5), seed=channels, dtype=torch.float32)
        torch.testing.assert_close(forward(x, 5, 1e-4, 0.75, 2.0, 1), lrn.lrn_forward(x, 5, 1e-4, 0.75, 2.0, 1))
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("compile", [False, True])
def test_fast_lrn_matches_reference(compile, device):
    backend = "inductor" if device == "cuda" else "aot_eager"  # the CPU variant compiles in a second
    lrn = torch.compile(fast_local_response_norm, backend=backend) if compile else fast_local_response_norm
    x = activations((4, 96, 27, 27), seed=6, dtype=torch.float32).to(device, memory_format=torch.channels_last)
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    lrn(a).backward(g)
    expect = local_response_norm(b)
    expect.backward(g.double())
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lrn(x).double(), expect.detach(), rtol=1e-5, atol=1e-6)


def test_eager_lrn_compiles_inside_the_function_both_ways_once_per_layer(device):
    """The eager model's path on a GPU: _LRN.forward compiles on the calling thread, its backward on autograd's CUDA
    worker thread. Each of the paper's two LRN layers (96 maps; 256 in two towers) gets one forward and one backward
    graph, whatever the batch, and both match the plain formula. On the CPU the plain maths runs, compiling nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for batch in (4, 3, 4):
        for channels, size, groups in ((96, 27, 1), (256, 13, 2)):
            x = activations((batch, channels, size, size), seed=channels + batch, dtype=torch.float32).to(device)
            x = x.to(memory_format=torch.channels_last).requires_grad_()
            ref = x.detach().double().requires_grad_()
            g = torch.randn_like(x)
            y = fast_local_response_norm(x, groups=groups)
            y.backward(g)
            want = torch.cat([local_response_norm(half) for half in ref.chunk(groups, 1)], 1)
            want.backward(g.double())
            torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)
    compiles = counters["stats"]["unique_graphs"]
    print(f"eager LRN compiles: {compiles}")  # .ci/gpu's summary reports this line from the tests' log
    if device == "cpu":
        assert lrn._maths(x) == (lrn.lrn_forward, lrn.lrn_backward) and compiles == 0
        return
    assert lrn._maths(x) is lrn._fused()  # the compiled pair ran, not the plain maths
    assert compiles == 4
