"""AlexNet (§3, Figure 2): layer shapes, parameter count, §5 initialisation, towers, speed habits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from model import AlexNet
from model.alexnet import TOWER_CONVS, TowerConv

PAPER_SHAPES = {  # Figure 2, per image, towers together
    "conv1": (96, 55, 55),
    "lrn1": (96, 55, 55),
    "pool1": (96, 27, 27),
    "conv2": (256, 27, 27),
    "lrn2": (256, 27, 27),
    "pool2": (256, 13, 13),
    "conv3": (384, 13, 13),
    "conv4": (384, 13, 13),
    "conv5": (256, 13, 13),
    "pool5": (256, 6, 6),
    "fc6": (4096,),
    "fc7": (4096,),
    "fc8": (1000,),
}


@pytest.fixture(scope="module")
def built_once():
    torch.manual_seed(0)
    return AlexNet().eval()


def fingerprint(net) -> tuple:
    """Weights, mode and memory format: what a test could change in place."""
    return (
        [p.sum().item() for p in net.parameters()],
        [p.stride() for p in net.parameters()],
        [m.training for m in net.modules()],
    )


@pytest.fixture
def paper(built_once):
    """The paper's model in eval mode, shared by the tests that only read it: one that changed it fails here."""
    before = fingerprint(built_once)
    yield built_once
    assert fingerprint(built_once) == before, "this test changed the shared model: give it own_paper"


@pytest.fixture
def own_paper(built_once):
    """A copy of the paper's model of its own, for a test that changes weights, mode or memory format."""
    return copy.deepcopy(built_once)


def layer_outputs(net, x):
    """Per-image output shape of every layer in PAPER_SHAPES for input x."""
    shapes = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.update({name: tuple(out.shape[1:])})
        )
        for name in PAPER_SHAPES
    ]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return shapes


def layer_output(net, x, name):
    """The output of one named layer for input x."""
    out = []
    hook = getattr(net, name).register_forward_hook(lambda _m, _i, o: out.append(o.clone()))
    with torch.no_grad():
        net(x)
    hook.remove()
    return out[0]


@pytest.mark.parametrize("towers", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_layer_shapes_at_224(paper, towers):
    net = paper if towers == 2 else AlexNet(towers=1).eval()
    assert layer_outputs(net, torch.randn(1, 3, 224, 224)) == PAPER_SHAPES


def test_parameter_counts(paper):
    assert sum(p.numel() for p in paper.parameters()) == 60_965_224
    # One tower: conv2, conv4 and conv5 see all of the previous layer's maps.
    extra = 256 * 48 * 5 * 5 + 384 * 192 * 3 * 3 + 256 * 192 * 3 * 3
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        assert sum(p.numel() for p in AlexNet(towers=1).parameters()) == 60_965_224 + extra
        assert sum(p.numel() for p in AlexNet(num_classes=10).parameters()) == 60_965_224 - 990 * 4097


def test_initialisation_follows_section_5(paper):
    for name, p in paper.named_parameters():
        layer = name.split(".")[0]
        if name.endswith("bias"):
            want = 1.0 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
            assert torch.equal(p, torch.full_like(p, want)), name
        else:
            n = p.numel()  # sample mean and std of N(0, 0.01^2): a 6-sigma band for n draws
            assert abs(p.mean().item()) < 6 * 0.01 / n**0.5, name
            assert abs(p.std().item() - 0.01) < 6 * 0.01 / (2 * n) ** 0.5, name


@pytest.mark.parametrize("impl", TOWER_CONVS)
def test_tower_convs_are_grouped_and_cross_convs_are_dense(impl):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5, 5)
    grouped, cross = TowerConv(8, 6, 3, padding=1, impl=impl), TowerConv(8, 6, 3, padding=1, cross=True, impl=impl)
    w = torch.cat([grouped[0].weight, grouped[1].weight])
    b = torch.cat([grouped[0].bias, grouped[1].bias])
    torch.testing.assert_close(grouped(x), F.conv2d(x, w, b, padding=1, groups=2), rtol=0, atol=1e-6)
    w = torch.cat([cross[0].weight, cross[1].weight])
    b = torch.cat([cross[0].bias, cross[1].bias])
    torch.testing.assert_close(cross(x), F.conv2d(x, w, b, padding=1), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["grouped", "split"])
def test_every_tower_conv_is_the_same_network(impl):
    """Outputs and every gradient of the grouped and split forms equal the dense block-diagonal one."""
    torch.manual_seed(2)
    dense, other = AlexNet(num_classes=10).eval(), AlexNet(num_classes=10, tower_convs=impl).eval()
    other.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)
    for net in (dense, other):
        net(x).square().sum().backward()
    torch.testing.assert_close(other(x), dense(x), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(dense.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_tower_conv_is_refused():
    with pytest.raises(ValueError, match="dense, grouped, split"):
        AlexNet(tower_convs="sparse")


def test_towers_do_not_talk_before_conv3(own_paper):
    """Changing tower B's conv1 filters leaves tower A's maps up to pool2 untouched (§3.2)."""
    x = torch.randn(1, 3, 64, 64)
    before = layer_output(own_paper, x, "pool2")
    with torch.no_grad():
        own_paper.conv1[1].weight.mul_(3.0)
    after = layer_output(own_paper, x, "pool2")
    assert torch.equal(before[:, :128], after[:, :128])
    assert not torch.allclose(before[:, 128:], after[:, 128:])


def test_small_crops_pool_to_6x6_and_224_does_not(paper):
    """fc6 sees pool5's maps as they are at 224, and a 64-pixel crop's 1x1 maps spread over the 6x6 it expects."""
    maps = {}
    hook = paper.pool5.register_forward_hook(lambda m, i, out: maps.setdefault(out.shape[-1], out))
    fc = lambda x: paper.fc8(F.relu(paper.fc7(F.relu(paper.fc6(x.flatten(1))))))  # noqa: E731 (eval: no dropout)
    with torch.no_grad():
        small, full = paper(torch.randn(2, 3, 64, 64)), paper(torch.randn(2, 3, 224, 224))
        hook.remove()
        assert sorted(maps) == [1, 6]
        assert torch.allclose(small, fc(maps[1].expand(-1, -1, 6, 6)), atol=1e-6)
        assert torch.equal(full, fc(maps[6]))


def test_dropout_only_in_training(own_paper):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        evaluated = own_paper(x)
        own_paper.train()
        torch.manual_seed(2)
        a = own_paper(x)
        torch.manual_seed(2)
        b = own_paper(x)
        c = own_paper(x)
        own_paper.eval()
        assert torch.equal(evaluated, own_paper(x))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, evaluated)


def test_dropout_drops_the_outputs_of_fc6_and_fc7(own_paper):
    """§4.2: hidden neurons of fc6 and fc7 are zeroed with p = 0.5 (kept ones scaled by 2); fc6's input is not."""
    seen = {}
    for n in ("fc6", "fc7", "fc8"):  # on this test's own model: no need to remove them
        getattr(own_paper, n).register_forward_hook(
            lambda _m, args, out, n=n: seen.update({n: (args[0].clone(), out.clone())})
        )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        own_paper(x)
        fc6_input_eval = seen["fc6"][0]
        own_paper.train()
        own_paper(x)
    assert torch.equal(seen["fc6"][0], fc6_input_eval)
    for layer, following in (("fc6", "fc7"), ("fc7", "fc8")):
        hidden, dropped = F.relu(seen[layer][1]), seen[following][0]
        kept, alive = dropped != 0, hidden > 0
        assert alive.sum() > 2000 and 0.45 < kept.sum() / alive.sum() < 0.55, layer
        torch.testing.assert_close(dropped[kept], 2 * hidden[kept])


def test_channels_last_bf16_keeps_layout_through_every_layer(own_paper):
    """Every conv, LRN and pool sees channels-last input under bf16 autocast: no hidden conversions."""
    seen = []
    layers = [n for n in PAPER_SHAPES if not n.startswith("fc")]
    for n in layers:
        getattr(own_paper, n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.append((n, args[0].is_contiguous(memory_format=torch.channels_last)))
        )
    net_input = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    own_paper.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = own_paper(net_input)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert seen == [(n, True) for n in layers]


@pytest.mark.slow
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unavailable here")
def test_compiles_without_graph_breaks(paper):
    explain = torch._dynamo.explain(paper)(torch.randn(1, 3, 64, 64))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_bad_tower_count_is_rejected():
    with pytest.raises(ValueError, match="towers"):
        AlexNet(towers=3)


@pytest.mark.slow
@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unavailable here")
def test_compiled_bf16_channels_last_matches_eager(device):
    """Compiled, bf16 autocast, channels-last: its scores and gradients no further from fp32 eager's than bf16 eager's
    are (twice, for kernels that round otherwise). Inductor on a GPU; AOT autograd's eager backend on the CPU."""
    torch.manual_seed(0)
    net = AlexNet().to(device, memory_format=torch.channels_last).eval()
    size = 224 if device == "cuda" else 64
    x = torch.randn(8, 3, size, size, device=device).contiguous(memory_format=torch.channels_last) * 50
    compiled = torch.compile(net, backend="inductor" if device == "cuda" else "aot_eager")

    def run(fn, bf16: bool):
        net.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = fn(x)
        out.float().square().sum().backward()
        return out.float(), net.conv1[0].weight.grad.float().clone()

    reference, eager, ours = run(net, False), run(net, True), run(compiled, True)
    for r, e, c in zip(reference, eager, ours):
        bf16_error, error = (e - r).abs().max().item(), (c - r).abs().max().item()
        print(f"max error against fp32: bf16 eager {bf16_error:.4g}, compiled {error:.4g}")
        assert 0 < bf16_error and error <= 2 * bf16_error  # bf16 ran, and compiling added no error of its own
