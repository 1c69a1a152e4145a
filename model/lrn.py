"""Local response normalisation, paper §3.3: b_i = a_i / (k + alpha * sum_{|j-i|<=n/2} a_j^2) ** beta.

torch.nn.LocalResponseNorm divides alpha by n; the paper does not, so neither does anything here.
"""

import functools
import importlib.util

import torch
from torch import nn

# §3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75
SIZE, ALPHA, BETA, K = 5, 1e-4, 0.75, 2.0


def local_response_norm(x, size=SIZE, alpha=ALPHA, beta=BETA, k=K):
    """The §3.3 formula written plainly, channel by channel: the reference the fast path is tested against."""
    if size % 2 == 0:
        raise ValueError(f"LRN size must be odd (the window is i-n/2..i+n/2), got {size}")
    half, sq = size // 2, x * x
    s = torch.stack([sq[:, max(0, i - half) : i + half + 1].sum(1) for i in range(x.shape[1])], 1)
    return x / (k + alpha * s) ** beta


def window_sum(t, size, groups):
    """Sum over `size` adjacent channels, zero beyond the edges of each of `groups` channel groups.

    Shifted in-place adds on views of a clone keep the memory format (channels-last) in eager, and
    inductor fuses the chain into one kernel; a 5-D pad (torch's own LRN) would fall back to NCHW."""
    n, c, h, w = t.shape
    s = t.clone()
    tv, sv = t.view(n, groups, c // groups, h, w), s.view(n, groups, c // groups, h, w)
    for d in range(1, size // 2 + 1):
        sv[:, :, d:].add_(tv[:, :, :-d])  # add_ on the view: `+=` would also copy the slice onto itself
        sv[:, :, :-d].add_(tv[:, :, d:])
    return s


def lrn_forward(x, size, alpha, beta, k, groups):
    """b = a (k + alpha S)^-beta, in at least fp32: in bf16, k + alpha*S rounds to k and the normalisation vanishes."""
    a = x.to(torch.promote_types(x.dtype, torch.float32))
    return (a * (k + alpha * window_sum(a * a, size, groups)) ** -beta).to(x.dtype)


def lrn_backward(x, g, size, alpha, beta, k, groups):
    """dL/da_j = g_j d_j^-beta - 2 alpha beta a_j sum_{i in W(j)} g_i a_i d_i^(-beta-1), d = k + alpha S.

    Derived by hand from b_i = a_i d_i^-beta (the window is symmetric, so i in W(j) iff j in W(i));
    d is recomputed from the saved input, which is cheaper than storing it once fused."""
    wide = torch.promote_types(x.dtype, torch.float32)
    a, g = x.to(wide), g.to(wide)
    d = k + alpha * window_sum(a * a, size, groups)
    p = d**-beta
    return (g * p - (2 * alpha * beta) * a * window_sum(g * a * p / d, size, groups)).to(x.dtype)


@functools.cache
def _fused():
    """The same maths compiled into one CUDA kernel each way, for models that run eagerly.

    Static shapes but the batch: lrn1 and lrn2 differ in channels and size, and by default the second layer would
    recompile both into slower kernels generic in every dimension; fully static, every batch size (training, the
    last evaluation batch, ten-crop's ten views) would compile anew, past dynamo's limit of 8 per function."""

    def batch_dynamic(fn):
        compiled = torch.compile(fn, dynamic=False)

        def call(*args):
            for a in args:
                if isinstance(a, torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            return compiled(*args)

        return call

    return batch_dynamic(lrn_forward), batch_dynamic(lrn_backward)


def _maths(x):
    # Inside a compiled model inductor fuses the plain maths with the ReLU before and the pool after;
    # eager CUDA would otherwise launch a dozen kernels over fp32 copies per call.
    if x.is_cuda and not torch.compiler.is_compiling() and importlib.util.find_spec("triton"):
        return _fused()
    return lrn_forward, lrn_backward


class _LRN(torch.autograd.Function):
    """§3.3 LRN with the hand-derived backward; only the input is saved."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k, groups):
        ctx.save_for_backward(x)
        ctx.hyper = (size, alpha, beta, k, groups)
        return _maths(x)[0](x, size, alpha, beta, k, groups)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _maths(x)[1](x, g, *ctx.hyper), None, None, None, None, None


def fast_local_response_norm(x, size=SIZE, alpha=ALPHA, beta=BETA, k=K, groups=1):
    """§3.3 LRN within each of `groups` channel groups (the paper's towers normalise only their own maps)."""
    if size % 2 == 0:
        raise ValueError(f"LRN size must be odd (the window is i-n/2..i+n/2), got {size}")
    if x.shape[1] % groups:
        raise ValueError(f"LRN: {x.shape[1]} channels do not split into {groups} groups")
    return _LRN.apply(x, size, alpha, beta, k, groups)


class LocalResponseNorm(nn.Module):
    """§3.3 LRN as a layer; `groups` keeps each tower's window inside its own maps."""

    def __init__(self, size=SIZE, alpha=ALPHA, beta=BETA, k=K, groups=1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x):
        return fast_local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups)

    def extra_repr(self):
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"
