"""Option A's shortcut computed with its block's first conv as one op (layers._ConvSubsamplePad)
and the kernel's in-place subsampled add: the same gradients as the separate modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reslab.models import create_model, layers
from reslab.models.bn_act import load_kernel, use_fused_bn_act
from reslab.models.tiled_wgrad import use_tiled_wgrad

CL = torch.channels_last


def _step(model, x, y, *, combined: bool, autocast: bool, monkeypatch) -> tuple[list, int]:
    """Gradients of one cross-entropy step of a copy of `model`, and how many times the combined
    op ran; combined=False makes every block call its conv and shortcut separately."""
    calls = [0]
    apply = layers._ConvSubsamplePad.apply

    def counted(*args):
        calls[0] += 1
        return apply(*args)

    with monkeypatch.context() as m:
        m.setattr(layers._ConvSubsamplePad, "apply", counted)
        if not combined:
            m.setattr(layers.PadShortcut, "with_conv", lambda self, conv, x, **kw: None)
        net = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
    return [p.grad for p in net.parameters()], calls[0]


@pytest.mark.parametrize(
    "name,size,kw",
    [
        ("resnet20", 16, {}),
        ("resnet18", 32, {"shortcut": "A"}),
        ("resnet50", 32, {"shortcut": "A"}),
    ],
)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("flags", [False, True])
def test_combined_option_a_gives_the_separate_gradients(name, size, kw, fmt, autocast, flags,
                                                        monkeypatch) -> None:  # fmt: skip
    """Every parameter's gradient equals the one from separate conv and shortcut calls, bit for
    bit (the same sums), in fp32 and bf16 autocast, NCHW and channels_last, with and without the
    fused-kernel and tiling flags; and the combined op did run (at every option-A block)."""
    if flags and load_kernel() is None:
        pytest.skip("no C++ toolchain for the kernel")
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw).to(memory_format=fmt)
    use_fused_bn_act(model, flags)
    use_tiled_wgrad(model, flags)
    x = torch.randn(4, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (4,))
    new, n_new = _step(model, x, y, combined=True, autocast=autocast, monkeypatch=monkeypatch)
    old, n_old = _step(model, x, y, combined=False, autocast=autocast, monkeypatch=monkeypatch)
    blocks = sum(isinstance(m, layers.PadShortcut) for m in model.modules())
    assert blocks >= 2 and n_new == blocks and n_old == 0
    for a, b in zip(new, old, strict=True):
        assert a is not None and torch.equal(a, b)


def test_the_combined_op_matches_autograd_through_slicing_in_float64() -> None:
    """Against plain autograd of conv2d and x[:, :, ::2, ::2] padded with F.pad (float64)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False).double()
    sc = layers.PadShortcut(16, 32, 2)
    x = torch.randn(3, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    out, short = sc.with_conv(conv, x)
    g1, g2 = torch.randn_like(out), torch.randn_like(short)
    dx, dw = torch.autograd.grad((out * g1).sum() + (short * g2).sum(), (x, conv.weight))
    ref_out = F.conv2d(x, conv.weight, stride=2, padding=1)
    ref_short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    rx, rw = torch.autograd.grad((ref_out * g1).sum() + (ref_short * g2).sum(), (x, conv.weight))
    assert torch.equal(out, ref_out) and torch.equal(short, ref_short)
    torch.testing.assert_close(dx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, rw, rtol=1e-12, atol=1e-12)


def test_the_separate_calls_are_kept_where_one_op_would_change_something() -> None:
    """Hooks on the conv or the shortcut still run (the modules are called), and outside eager
    training (no gradient, an input without grad, a conv with bias) nothing is combined."""
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
    sc = layers.PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    assert sc.with_conv(conv, x) is not None
    seen = []
    for mod in (conv, sc):
        h = mod.register_forward_hook(lambda *a: seen.append(1))
        assert sc.with_conv(conv, x) is None
        h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert sc.with_conv(conv, x) is None
    h.remove()
    with torch.no_grad():
        assert sc.with_conv(conv, x) is None
    assert sc.with_conv(conv, x.detach()) is None
    biased = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
    assert sc.with_conv(biased, x) is None
    # fp32 weights with a bf16 input outside autocast: conv2d's own error, not a silent cast
    xb = x.detach().bfloat16().requires_grad_()
    assert sc.with_conv(conv, xb) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sc.with_conv(conv, xb) is not None  # fp32 weights: cast as autocast casts them
        assert sc.with_conv(conv.double(), xb) is None  # autocast leaves fp64 (conv2d raises)


def test_a_frozen_conv_gets_no_weight_gradient_and_the_input_its_full_one() -> None:
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False).requires_grad_(False)
    sc = layers.PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    out, short = sc.with_conv(conv, x)
    (out.square().sum() + short.sum()).backward()
    assert conv.weight.grad is None
    x2 = x.detach().requires_grad_()
    (conv(x2).square().sum() + sc(x2).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(load_kernel() is None, reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape,lo,cg,s",
    [((8, 16, 32, 32), 8, 32, 2), ((3, 32, 7, 9), 16, 64, 2), ((2, 48, 5, 5), 5, 60, 2),
     ((2, 16, 6, 6), 0, 16, 1), ((1, 64, 9, 4), 0, 64, 3)],
)  # fmt: skip
def test_the_kernels_subsampled_add_is_torchs_strided_add_bit_for_bit(dtype, shape, lo, cg, s):
    ext = load_kernel()
    n, c, h, w = shape
    dx = torch.randn(shape).to(dtype).contiguous(memory_format=CL)
    g = torch.randn(n, cg, -(-h // s), -(-w // s)).to(dtype).contiguous(memory_format=CL)
    ref = dx.clone()
    ref[:, :, ::s, ::s] += g[:, lo : lo + c]
    out = dx.clone()
    ext.add_subsampled(out, g, s, lo)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="subsampled"):
        ext.add_subsampled(out, g[:, :, :1].contiguous(memory_format=CL), s, lo)
    # an NCHW dx is left to torch's add
    assert layers._kernel_add_subsampled(out.contiguous(), g, s, lo) is False


@pytest.mark.skipif(load_kernel() is None, reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape,s,lo,hi",
    [((8, 16, 32, 32), 2, 8, 8), ((3, 32, 7, 9), 2, 16, 16), ((2, 48, 5, 5), 2, 5, 7),
     ((2, 16, 6, 6), 1, 0, 0), ((1, 64, 9, 4), 3, 0, 64)],
)  # fmt: skip
def test_the_kernels_subsample_pad_is_the_sliced_copy(dtype, shape, s, lo, hi):
    """Option A's shortcut from the kernel (one pass) equals slicing and zero padding, values
    and layout, NaN and inf included; _pad_forward takes it only where it applies."""
    x = torch.randn(shape).to(dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    x = x.contiguous(memory_format=CL)
    ref = F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, lo, hi))
    out = load_kernel().subsample_pad(x, s, lo, hi)
    assert out.is_contiguous(memory_format=CL) and out.shape == ref.shape
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # NaN == NaN, -0 != 0
    assert torch.equal(out.view(bits), ref.view(bits))
    got = layers._pad_forward(x, s, lo, hi, 1)
    assert torch.equal(got.nan_to_num(), ref.nan_to_num()) and got.is_contiguous(memory_format=CL)
    assert layers._kernel_takes(x) and not layers._kernel_takes(x.contiguous())
    assert not layers._kernel_takes(x[:, :8].contiguous(memory_format=CL))  # 8 channels
    nchw = layers._pad_forward(x.contiguous(), s, lo, hi, 1)  # torch's ops, x's own layout
    assert torch.equal(nchw.nan_to_num(), ref.nan_to_num()) and nchw.is_contiguous()


@pytest.mark.parametrize("kernel", [False, True])
def test_double_backward_through_option_a_blocks_matches_autograd(kernel, monkeypatch) -> None:
    """create_graph=True (an input-gradient penalty): the shortcut's gradient stays in the graph
    whether or not the kernel is loaded (it writes behind autograd's back)."""
    if kernel and load_kernel() is None:
        pytest.skip("no C++ toolchain for the kernel")
    if not kernel:
        monkeypatch.setattr(layers, "_kernel_add_subsampled", lambda *a: False)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).to(memory_format=CL)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))

    def grads(with_conv):
        with monkeypatch.context() as m:
            if not with_conv:
                m.setattr(layers.PadShortcut, "with_conv", lambda self, conv, x, **kw: None)
                m.setattr(layers, "_eager_training", lambda x: False)  # plain slicing + F.pad
            net, xi = copy.deepcopy(model), x.clone().requires_grad_()
            (gx,) = torch.autograd.grad(F.cross_entropy(net(xi), y), xi, create_graph=True)
            gx.square().sum().backward()
        return [p.grad for p in net.parameters()]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_meta_training_forward_falls_back() -> None:
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False, device="meta")
    sc = layers.PadShortcut(16, 32, 2)
    assert sc.with_conv(conv, torch.empty(2, 16, 8, 8, device="meta", requires_grad=True)) is None
