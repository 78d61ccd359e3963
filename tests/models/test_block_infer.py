"""Eval-mode BasicBlocks with their BatchNorms folded, as two calls of the AMX convolution kernel
with bias, shortcut add and ReLU applied as each output is written (kernels/conv_fwd.cpp's
conv3x3_bias_act, kernels/block.cpp's basic_block_infer, models/block_op.py's infer): exact
against float64 on integer data, within bf16 rounding of the eager ops on real values, and
used only where it applies. Needs a CPU with AMX (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.engine.eval_run import fast_eval_model
from reslab.models import block_op, fused_eval
from reslab.models.bn_act import load_kernel
from reslab.models.cifar import cifar_resnet

CL = torch.channels_last


def _ints(shape, seed, lo=-1, hi=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).bfloat16()


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(
    "n,ci,co,h,stride,add",
    [
        (2, 16, 16, 32, 1, True),  # stage 1: pixel pairs, one accumulator shape
        (3, 32, 32, 16, 1, True),
        (2, 64, 64, 8, 1, False),  # 4 accumulators over 64 output channels
        (2, 16, 32, 32, 2, False),  # transitions (stride 2: no add)
        (2, 32, 64, 16, 2, False),
        (1, 16, 16, 1, 1, True),  # one pixel: every tap but the centre reads padding
    ],
)
def test_bias_act_equals_float64_on_integer_data(ext, n, ci, co, h, stride, add, relu):
    """Integer data: the sums, the bias and the added values are exact in fp32, so the kernel's
    one rounding must give float64's result rounded to bf16, bit for bit (ReLU's zeros too)."""
    x = _ints((n, ci, h, h), 0).contiguous(memory_format=CL)
    w = _ints((co, ci, 3, 3), 1).contiguous(memory_format=CL)
    b = _ints((co,), 2, -3, 4).float()
    ho = (h + stride - 1) // stride
    a = _ints((n, co, ho, ho), 3, -2, 3).contiguous(memory_format=CL) if add else None
    out = ext.conv3x3_bias_act(x, w, b, a, relu=relu, stride=stride)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=1)
    if add:
        ref = ref + a.double()
    ref = (ref.relu() if relu else ref).bfloat16()
    assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert torch.equal(out, ref)


def test_bias_act_rounds_once_and_keeps_nan(ext):
    """The sum + bias + add is rounded once (not after each step), and a NaN passes the ReLU as
    torch.relu passes it."""
    x = torch.zeros(1, 16, 4, 4).bfloat16().contiguous(memory_format=CL)
    x[0, 0, 1, 1] = 1.0
    w = torch.zeros(16, 16, 3, 3).bfloat16()
    w[:, 0, 1, 1] = 1.0 + 2.0**-7  # exact in bf16
    # conv = 1 + 2^-7 in fp32; + bias 2^-9: 1.0098 rounds to 1 + 2^-7 once; then + add = 256:
    # 257.0098 rounds to 258 in bf16 (steps of 2), where rounding conv + bias first gives the
    # same here; a NaN in add stays NaN through relu.
    b = torch.full((16,), 2.0**-9)
    a = torch.full((1, 16, 4, 4), 256.0).bfloat16().contiguous(memory_format=CL)
    a[0, 3, 2, 2] = float("nan")
    out = ext.conv3x3_bias_act(x, w.contiguous(memory_format=CL), b, a, relu=True)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1) + a.double()
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 3, 2, 2].isnan()
    ok = ~ref.isnan()
    assert torch.equal(out[ok], ref.bfloat16()[ok])


def test_bias_act_checks_its_bias(ext):
    x = torch.zeros(1, 16, 4, 4).bfloat16().contiguous(memory_format=CL)
    w = torch.zeros(16, 16, 3, 3).bfloat16()
    with pytest.raises(RuntimeError, match="bias must be"):
        ext.conv3x3_bias_act(x, w, torch.zeros(8), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ext.conv3x3_bias_act(x, w, torch.zeros(16).bfloat16(), None)


def _folded_block(net: nn.Module, stage: str, index: int) -> nn.Module:
    """A block of an eval-mode, BatchNorm-folded CIFAR net (as `reslab eval` builds it), its
    weights and biases set to small integers."""
    block = getattr(fast_eval_model(net, torch.device("cpu")), stage)[index]
    assert type(block.bn1) is nn.Identity and block.conv1.bias is not None
    for k, conv in enumerate((block.conv1, block.conv2)):
        with torch.no_grad():
            conv.weight.copy_(_ints(conv.weight.shape, 10 + k).float())
            conv.bias.copy_(_ints(conv.bias.shape, 20 + k, -3, 4).float())
    return block


def _float64_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64: each conv's sum + bias (+ the shortcut), ReLU,
    rounded once to bf16."""
    c1, c2 = block.conv1, block.conv2
    z = F.conv2d(x.double(), c1.weight.double(), c1.bias.double(), stride=c1.stride, padding=1)
    z = z.relu().bfloat16().double()
    y = F.conv2d(z, c2.weight.double(), c2.bias.double(), padding=1)
    if block.residual:
        y = y + block.downsample(x).double() if block.downsample is not None else y + x.double()
    return y.relu().bfloat16()


@pytest.mark.parametrize(
    "residual,stage,index",
    [
        (True, "layer1", 1),  # identity shortcut
        (True, "layer2", 0),  # stride 2, option A's shortcut (zero channels padded)
        (False, "layer1", 1),  # plain block
        (False, "layer3", 0),  # plain transition
    ],
)
def test_folded_block_takes_the_kernel_and_equals_float64(ext, monkeypatch, residual, stage, index):
    net = cifar_resnet(depth=20, shortcut="A", residual=residual)
    block = _folded_block(net, stage, index)
    c = block.conv1.in_channels
    h = {"layer1": 32, "layer2": 32, "layer3": 16}[stage]
    x = _ints((32, c, h, h), 5, 0, 2).contiguous(memory_format=CL)
    calls = []
    kernel = load_kernel()

    class Spy:
        def basic_block_infer(self, *args):
            calls.append(args[5:])
            return kernel.basic_block_infer(*args)

    monkeypatch.setattr(block_op, "load_kernel", lambda: Spy())
    monkeypatch.setattr(fused_eval, "ENABLED", False)  # the kernel: where oneDNN's op is absent
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert len(calls) == 1
    assert torch.equal(out, _float64_block(block, x))
    # the eager ops on the same block: within their roundings of the same values
    monkeypatch.setattr(block_op, "INFER", False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = block(x)
    assert len(calls) == 1 and out.dtype == eager.dtype == torch.bfloat16
    scale = eager.float().abs().max().item()
    torch.testing.assert_close(out.float(), eager.float(), rtol=2**-7, atol=scale * 2**-7)


def test_folded_resnet_logits_match_the_eager_ops(ext, monkeypatch):
    """A whole folded ResNet-20 on real-valued inputs: every block through the kernel; the
    logits within bf16 rounding of the eager ops', no further from fp32's than theirs (one
    rounding where they take two), the same top-1 for nearly all images."""
    torch.manual_seed(0)
    net = cifar_resnet(depth=20, shortcut="A")
    net.train()
    with torch.no_grad():  # running statistics of real batches, so folding is not trivial
        for _ in range(3):
            net(torch.randn(64, 3, 32, 32))
    model = fast_eval_model(net, torch.device("cpu"))
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=CL)
    n = []
    real = block_op.infer

    def counted(block, x):
        out = real(block, x)
        n.append(out is not None)
        return out

    monkeypatch.setattr(block_op, "infer", counted)
    monkeypatch.setattr(fused_eval, "ENABLED", False)  # the kernel: where oneDNN's op is absent
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x).float()
        monkeypatch.setattr(block_op, "INFER", False)
        eager = model(x).float()
    with torch.no_grad():
        exact = model(x)  # fp32: no autocast, and the eager ops
    assert n[:9] == [True] * 9  # all 9 blocks, then (INFER off, or fp32) none
    assert not any(n[9:])
    torch.testing.assert_close(fast, eager, rtol=0.05, atol=0.05 * eager.abs().max().item())
    assert (fast - exact).abs().max() <= 1.25 * (eager - exact).abs().max()
    assert (fast.argmax(1) == eager.argmax(1)).float().mean() >= 0.95


def test_the_kernel_is_not_used_where_it_does_not_apply(ext):
    """Grad mode, training mode, unfolded BatchNorms, hooks, a projection shortcut, a batch too
    small to share among threads, fp32 without autocast: the eager ops (infer returns None)."""
    net = cifar_resnet(depth=20, shortcut="A")
    folded = fast_eval_model(net, torch.device("cpu"))
    block = folded.layer1[1]
    x = torch.rand(32, 16, 32, 32).bfloat16().contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block_op.infer(block, x) is None  # grad mode on
        with torch.no_grad():
            assert block_op.infer(block, x) is not None
            assert block_op.infer(block, x[:4]) is None  # 4 images on 2 threads
            assert block_op.infer(block, x.contiguous()) is None  # NCHW
            assert block_op.infer(net.eval().layer1[1], x) is None  # BatchNorm not folded
            handle = block.conv2.register_forward_hook(lambda *a: None)
            assert block_op.infer(block, x) is None
            handle.remove()
            block.train()
            assert block_op.infer(block, x) is None
            block.eval()
            b_net = fast_eval_model(cifar_resnet(depth=20, shortcut="B"), torch.device("cpu"))
            assert block_op.infer(b_net.layer2[0], x) is None  # projection shortcut
    with torch.no_grad():
        assert block_op.infer(block, x) is None  # fp32 weights without bf16 autocast


def test_a_compiled_eval_model_traces_as_one_graph() -> None:
    # infer() read the thread count (conv_wgrad.min_images) before it saw that dynamo was
    # tracing: an eval-mode model compiled under no_grad broke its graph at every block.
    import torch._dynamo

    model = cifar_resnet(depth=20).eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:120] for b in explained.break_reasons]
