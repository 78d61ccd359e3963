"""Eval-mode convolutions with bias, ReLU and the shortcut's add fused into oneDNN's convolution
(models/fused_eval.py), on models whose BatchNorms are folded: the eager ops' numbers (fp32: to
float rounding; bf16: no further from fp32 than the eager ops), every conv of every block type,
stem and projection taken, and used only where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reslab.engine.eval_run import fast_eval_model
from reslab.models import block_op, create_model, fused_eval

CL = torch.channels_last

pytestmark = pytest.mark.skipif(
    not fused_eval.available(), reason="this torch has no oneDNN fused convolution"
)


def _calibrated(name: str, size: int, **options) -> nn.Module:
    """`name` with BatchNorm running statistics of random batches (so folding is not trivial)."""
    torch.manual_seed(0)
    net = create_model(name, **options)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, size, size))
    return net


@pytest.fixture
def counted(monkeypatch):
    """The number of fused convolutions run (a list that grows by one per conv)."""
    calls = []
    real = fused_eval.conv

    def conv(conv_, x, dtype, **kw):
        calls.append((conv_.kernel_size, dtype, kw.get("add") is not None))
        return real(conv_, x, dtype, **kw)

    monkeypatch.setattr(fused_eval, "conv", conv)
    monkeypatch.setattr(fused_eval, "MIN_ELEMENTS", 0)  # the tests' small inputs too
    monkeypatch.setattr(block_op, "INFER", False)  # BasicBlocks here, not the AMX kernel
    return calls


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize(
    "name,size,options",
    [
        ("resnet20", 32, {}),  # option A: padded-subsample shortcuts stay eager
        ("resnet20", 32, {"shortcut": "B"}),  # projections at the transitions
        ("resnet20", 32, {"shortcut": "C"}),  # a projection on every block
        ("plain20", 32, {}),  # no shortcuts: every conv ends in a ReLU alone
        ("resnet18", 64, {}),  # 7x7 stride-2 stem, maxpool
        ("resnet50", 64, {}),  # bottlenecks: 1x1, 3x3, 1x1 + add
        ("resnet50", 64, {"stride_in_3x3": True}),
    ],
)
def test_fp32_equals_the_eager_ops_and_every_conv_is_fused(counted, monkeypatch, name, size,
                                                           options):  # fmt: skip
    model = fast_eval_model(_calibrated(name, size, **options), torch.device("cpu"))
    x = torch.randn(3, 3, size, size).contiguous(memory_format=CL)
    with torch.no_grad():
        fused = model(x)
        assert len(counted) == _convs(model)  # stem, blocks and projections: every conv
        assert all(dtype == torch.float32 for _, dtype, _ in counted)
        adds = sum(add for _, _, add in counted)
        blocks = sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())
        assert adds == (0 if name.startswith("plain") else blocks)
        monkeypatch.setattr(fused_eval, "ENABLED", False)
        eager = model(x)
    assert len(counted) == _convs(model)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet34", 64), ("resnet50", 64)])
def test_bf16_is_no_further_from_fp32_than_the_eager_ops(counted, monkeypatch, name, size):
    """Under bf16 autocast each conv's sum + bias (+ shortcut) is rounded once where the eager ops
    round after the conv and again after the add: no further from the fp32 logits than they are,
    and the same top-1 for nearly all inputs."""
    model = fast_eval_model(_calibrated(name, size), torch.device("cpu"))
    x = torch.randn(32, 3, size, size).contiguous(memory_format=CL)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model(x).float()
        assert len(counted) == _convs(model)
        assert all(dtype == torch.bfloat16 for _, dtype, _ in counted)
        monkeypatch.setattr(fused_eval, "ENABLED", False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = model(x).float()
        exact = model(x)  # fp32, eager ops
    assert len(counted) == _convs(model)
    err_fused, err_eager = (fused - exact).abs().max(), (eager - exact).abs().max()
    assert err_fused <= 1.25 * err_eager + 1e-6
    assert (fused.argmax(1) == exact.argmax(1)).float().mean() >= 0.9


def test_a_bf16_model_without_autocast_runs_fused_in_bf16(counted):
    model = fast_eval_model(_calibrated("resnet20", 32), torch.device("cpu")).bfloat16()
    x = torch.randn(4, 3, 32, 32).bfloat16().contiguous(memory_format=CL)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert len(counted) == _convs(model) and {d for _, d, _ in counted} == {torch.bfloat16}


def test_fused_path_is_not_used_where_it_does_not_apply(counted, monkeypatch):
    """Grad mode, training mode, unfolded BatchNorms, NCHW inputs, hooks on a conv or a block,
    fp16 autocast, int inputs, a disabled switch: the eager ops (nothing fused)."""
    net = _calibrated("resnet20", 32)
    folded = fast_eval_model(net, torch.device("cpu"))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    h = torch.randn(4, 16, 32, 32).contiguous(memory_format=CL)  # layer1's and layer2's input
    folded(x)  # grad mode on
    with torch.no_grad():
        net.eval()(x)  # BatchNorm not folded
        assert fused_eval.block(folded.layer1[0], h.contiguous()) is None  # NCHW
        assert fused_eval.stem(folded.conv1, folded.bn1, x.contiguous()) is None
        handle = folded.layer1[0].conv1.register_forward_hook(lambda *a: None)
        assert fused_eval.block(folded.layer1[0], h) is None
        handle.remove()
        handle = folded.layer2[0].register_forward_pre_hook(lambda *a: None)
        assert fused_eval.block(folded.layer2[0], h) is None
        handle.remove()
        with torch.autocast("cpu", dtype=torch.float16):
            assert fused_eval.compute_dtype(x) is None
        assert fused_eval.compute_dtype(x.to(torch.int32)) is None
        assert fused_eval.compute_dtype(x.double()) is None
        folded.train()
        folded(x)
        folded.eval()
        monkeypatch.setattr(fused_eval, "ENABLED", False)
        folded(x)
    assert counted == []
    with torch.no_grad():
        monkeypatch.setattr(fused_eval, "ENABLED", True)
        folded(x)
    assert len(counted) == _convs(folded)


def test_a_hook_on_a_folded_conv_still_sees_its_call(monkeypatch):
    """A forward hook on a conv (e.g. a feature extractor) is called: that block runs eagerly."""
    folded = fast_eval_model(_calibrated("resnet20", 32), torch.device("cpu"))
    seen = []
    folded.layer2[1].conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        folded(torch.randn(2, 3, 32, 32).contiguous(memory_format=CL))
    assert seen == [torch.Size([2, 32, 16, 16])]


def test_small_inputs_and_amx_blocks_keep_their_paths(monkeypatch):
    """Below MIN_ELEMENTS the eager ops (the fused op's per-call work does not pay there); a bf16
    BasicBlock the AMX kernel takes stays the kernel's."""
    calls = []
    real = fused_eval.conv
    monkeypatch.setattr(fused_eval, "conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    folded = fast_eval_model(_calibrated("resnet20", 32), torch.device("cpu"))
    h = torch.randn(2, 16, 32, 32).contiguous(memory_format=CL)  # 32,768 elements
    with torch.no_grad():
        assert h.numel() < fused_eval.MIN_ELEMENTS and fused_eval.compute_dtype(h) is None
        big = torch.randn(fused_eval.MIN_ELEMENTS // (16 * 32 * 32), 16, 32, 32)
        big = big.contiguous(memory_format=CL)
        assert fused_eval.compute_dtype(big) == torch.float32
        folded.layer1[1](big)
        assert calls == [1, 1]  # fp32: both convs fused
        kernel = block_op.infer(folded.layer1[1], big.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded.layer1[1](big)
        assert len(calls) == (2 if kernel is not None else 4)  # the kernel where it applies


@pytest.mark.parametrize(
    "name,size,options",
    [("resnet20", 32, {}), ("resnet20", 32, {"shortcut": "B"}), ("resnet50", 64, {})],
)
def test_packed_weights_give_the_same_bits_at_any_size(counted, monkeypatch, name, size, options):
    """enable_packing (InferenceModel in bf16): each conv's weight reordered for oneDNN once per
    input shape gives the outputs of the fused op reordering it on every call, to the bit, and
    takes every conv fused even below MIN_ELEMENTS (the counted fixture lifts that limit for
    the unpacked run; packing alone must lift it for the packed one)."""
    model = fast_eval_model(_calibrated(name, size, **options), torch.device("cpu"))
    x = torch.randn(2, 3, size, size).contiguous(memory_format=CL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unpacked = model(x)
        assert fused_eval.enable_packing(model) == _convs(model)
        monkeypatch.setattr(fused_eval, "MIN_ELEMENTS", 1 << 40)  # only packing lets it fuse
        packed = model(x)
        again = model(x)  # from the packed weights kept
    assert len(counted) == 3 * _convs(model)
    assert torch.equal(packed, unpacked) and torch.equal(again, unpacked)
    conv = model.conv1
    assert len(fused_eval._PACKED[conv]) == 1  # one input shape so far


def test_packed_weights_follow_weight_changes_and_keep_a_few_shapes(monkeypatch):
    monkeypatch.setattr(block_op, "INFER", False)
    model = fast_eval_model(_calibrated("resnet20", 32), torch.device("cpu"))
    fused_eval.enable_packing(model)
    cache = fused_eval._PACKED[model.layer1[0].conv1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for n in range(1, fused_eval.PACKED_SHAPES + 3):
            model(torch.randn(n, 3, 32, 32).contiguous(memory_format=CL))
        assert len(cache) == fused_eval.PACKED_SHAPES  # the oldest shapes dropped
        x = torch.randn(3, 3, 32, 32).contiguous(memory_format=CL)
        before = model(x)
        model.layer1[0].conv1.weight.mul_(-1)  # a changed weight is packed again
        after = model(x)
        monkeypatch.setattr(fused_eval, "PACK", False)
        monkeypatch.setattr(fused_eval, "MIN_ELEMENTS", 0)
        reference = model(x)  # the fused op reordering the changed weight itself
    assert not torch.equal(before, after) and torch.equal(after, reference)
    copy_ = __import__("copy").deepcopy(model)  # packed weights are not copied (weak, opaque)
    assert copy_.layer1[0].conv1 not in fused_eval._PACKED
