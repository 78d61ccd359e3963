"""The AMX convolution kernel (kernels/conv_fwd.cpp: a 3x3 conv of stride 1 or 2 and its input
gradient) against float64 and oneDNN. Needs a CPU with AMX (skipped elsewhere: the kernel is not built
there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

CL = torch.channels_last


def _ints(shape, seed):
    """Small integers in bf16: every product and sum is exact in fp32, and the results (at most
    9 * 128 * 4 in size) are exact in bf16 where they stay within 256, so the kernel must equal
    float64 rounded to bf16 exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).bfloat16()


def _check_exact(ext, n, ci, co, h, w, seed=0):
    x = _ints((n, ci, h, w), seed).contiguous(memory_format=CL)
    wt = _ints((co, ci, 3, 3), seed + 1)
    out = ext.conv3x3_forward(x, wt)
    ref = F.conv2d(x.double(), wt.double(), padding=1).bfloat16()
    # the weight is read through its strides: a training step's is channels_last
    assert torch.equal(ext.conv3x3_forward(x, wt.contiguous(memory_format=CL)), ref)
    assert out.shape == (n, co, h, w) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=CL)
    assert torch.equal(out, ref)
    # transposed: conv2d's input gradient for an output gradient dy, the weight as conv2d's
    dy = _ints((n, co, h, w), seed + 2).contiguous(memory_format=CL)
    dx = ext.conv3x3_forward(dy, wt, transposed=True)
    assert dx.shape == (n, ci, h, w) and dx.is_contiguous(memory_format=CL)
    ref_dx = F.conv_transpose2d(dy.double(), wt.double(), padding=1).bfloat16()
    assert torch.equal(dx, ref_dx)
    wt_cl = wt.contiguous(memory_format=CL)
    assert torch.equal(ext.conv3x3_forward(dy, wt_cl, transposed=True), ref_dx)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 16, 1, 1),  # one pixel: every tap but the centre reads padding
        (2, 16, 16, 32, 32),  # CIFAR stage 1: pixel pairs, a 16-value chunk per kernel row
        (3, 32, 32, 16, 16),  # stage 2: 3 chunks of 32 per kernel row
        (2, 64, 64, 8, 8),  # stage 3: 4 accumulators over 64 output channels
        (1, 16, 32, 5, 7),  # odd sides, more outputs than inputs
        (2, 32, 16, 6, 3),  # fewer outputs than inputs; rows shorter than a tile
        (2, 48, 16, 4, 4),  # 3 Ci = 144: 4 chunks of 32 and one of 16 without pixel pairs
        (1, 16, 64, 9, 9),  # 16-value chunks with 4 accumulators
        (4, 64, 16, 8, 8),  # 64 -> 16: one channel block, 6 accumulators
        (1, 128, 128, 4, 4),  # many chunks, two channel groups
        (5, 16, 48, 2, 40),  # rows longer than a block; 3 channel blocks
    ],
)
def test_the_kernel_equals_float64_exactly_on_exact_data(ext, shape):
    """Integer data: any misplaced or missing term (a tap at a row's end, the padding, a chunk,
    a channel block, an image of another thread) shows as a difference."""
    _check_exact(ext, *shape)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    ci=st.sampled_from([16, 32, 48, 64]),
    co=st.sampled_from([16, 32, 48, 64]),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
)
def test_any_shape_equals_float64_exactly(ext, n, ci, co, h, w):
    _check_exact(ext, n, ci, co, h, w, seed=n * 7 + h)


def _check_exact_stride2(ext, n, ci, co, h, w, seed=0):
    """Stride 2: the output ((h + 1) / 2 x (w + 1) / 2) and, where the output has 32k channels,
    the input gradient of an input of 2 Ho x 2 Wo (conv_transpose2d's output_padding 1 where h,
    w are even), both with contiguous and channels_last weights."""
    x = _ints((n, ci, h, w), seed).contiguous(memory_format=CL)
    wt = _ints((co, ci, 3, 3), seed + 1)
    ref = F.conv2d(x.double(), wt.double(), padding=1, stride=2).bfloat16()
    for weight in (wt, wt.contiguous(memory_format=CL)):
        out = ext.conv3x3_forward(x, weight, stride=2)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
        assert torch.equal(out, ref)
    if co % 32:
        return
    ho, wo = (h + 1) // 2, (w + 1) // 2
    dy = _ints((n, co, ho, wo), seed + 2).contiguous(memory_format=CL)
    ref_dx = F.conv_transpose2d(dy.double(), wt.double(), padding=1, stride=2, output_padding=1)
    ref_dx = ref_dx.bfloat16()
    for weight in (wt, wt.contiguous(memory_format=CL)):
        dx = ext.conv3x3_forward(dy, weight, transposed=True, stride=2)
        assert dx.shape == (n, ci, 2 * ho, 2 * wo) and dx.is_contiguous(memory_format=CL)
        assert torch.equal(dx, ref_dx)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 16, 32, 32, 32),  # CIFAR's first transition: a 16-value chunk per kernel row
        (3, 32, 64, 16, 16),  # the second: 3 chunks of 32, 4 accumulators
        (1, 16, 32, 1, 1),  # one pixel: only the centre tap reads x
        (1, 16, 16, 5, 7),  # odd sides: the last output row and column read the padding
        (1, 48, 32, 9, 9),  # 3 Ci = 144; the even rows' buffer starts inside a pixel
        (2, 64, 32, 8, 8),  # fewer outputs than inputs: the input gradient has 64 channels
        (1, 128, 128, 4, 6),  # many chunks, two channel groups
        (5, 32, 32, 2, 40),  # rows longer than a block
    ],
)
def test_stride_2_equals_float64_exactly_on_exact_data(ext, shape):
    """Stride 2's own layouts (x's odd and even rows in two buffers; the input gradient's four
    phases, 1, 2 or 4 taps each): a misplaced row, phase or tap shows as a difference."""
    _check_exact_stride2(ext, *shape)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 4),
    ci=st.sampled_from([16, 32, 48, 64]),
    co=st.sampled_from([16, 32, 64]),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
)
def test_stride_2_any_shape_equals_float64_exactly(ext, n, ci, co, h, w):
    _check_exact_stride2(ext, n, ci, co, h, w, seed=n * 5 + w)


@pytest.mark.parametrize("c,side", [(16, 32), (32, 16)])
def test_stride_2_on_real_data_is_as_accurate_as_onednn(ext, c, side):
    """A CIFAR net's transitions (c -> 2c channels) on real-valued data: within one bf16 step
    of oneDNN's output and input gradient, and as close to float64."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(12, c, side, side, generator=g).bfloat16().contiguous(memory_format=CL)
    wt = (torch.randn(2 * c, c, 3, 3, generator=g) * 0.1).bfloat16()
    dy = torch.randn(12, 2 * c, side // 2, side // 2, generator=g).bfloat16()
    dy = dy.contiguous(memory_format=CL)
    args = ((2, 2), (1, 1), (1, 1), False, (0, 0), 1)
    cases = (
        (ext.conv3x3_forward(x, wt, stride=2), F.conv2d(x.double(), wt.double(), padding=1, stride=2),
         torch.ops.aten.convolution(x, wt, None, *args)),
        (ext.conv3x3_forward(dy, wt, transposed=True, stride=2),
         F.conv_transpose2d(dy.double(), wt.double(), padding=1, stride=2, output_padding=1),
         torch.ops.aten.convolution_backward(dy, x, wt, None, *args, [True, False, False])[0]),
    )  # fmt: skip
    for got, ref, one in cases:
        assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + ref.abs().max() * 1e-5).all()
        assert ((got.double() - one.double()).abs() <= ref.abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("c,side", [(16, 32), (32, 16), (64, 8)])
def test_on_real_data_it_is_as_accurate_as_onednn(ext, c, side):
    """Real-valued data: fp32 sums rounded once to bf16, so within half a bf16 step (plus the
    fp32 sum's own error) of float64; oneDNN's error is the same size."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(12, c, side, side, generator=g).bfloat16().contiguous(memory_format=CL)
    wt = (torch.randn(c, c, 3, 3, generator=g) * 0.1).bfloat16()
    args = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    back = torch.ops.aten.convolution_backward
    for transposed in (False, True):
        got = ext.conv3x3_forward(x, wt, transposed=transposed)
        op = F.conv_transpose2d if transposed else F.conv2d
        ref = op(x.double(), wt.double(), padding=1)
        bound = ref.abs() * 2**-8 + ref.abs().max() * 1e-5
        assert ((got.double() - ref).abs() <= bound).all()
        if transposed:
            one = back(x, x, wt, None, *args, [True, False, False])[0]
        else:
            one = torch.ops.aten.convolution(x, wt, None, *args)
        # the same rounding of nearly the same fp32 sums: at most one bf16 step apart
        assert ((got.double() - one.double()).abs() <= ref.abs() * 2**-7 + 1e-6).all()


def test_the_result_does_not_depend_on_the_number_of_threads(ext):
    x = torch.randn(7, 32, 12, 10).bfloat16().contiguous(memory_format=CL)
    wt = torch.randn(16, 32, 3, 3).bfloat16()
    calls = (
        lambda: ext.conv3x3_forward(x, wt),
        lambda: ext.conv3x3_forward(x, wt, stride=2),
        lambda: ext.conv3x3_forward(x, wt.transpose(0, 1).contiguous(), transposed=True, stride=2),
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [f() for f in calls]
        torch.set_num_threads(max(2, threads))
        many = [f() for f in calls]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_an_empty_batch_gives_an_empty_output(ext):
    x = torch.empty(0, 16, 8, 8).bfloat16().contiguous(memory_format=CL)
    out = ext.conv3x3_forward(x, torch.ones(32, 16, 3, 3).bfloat16())
    assert out.shape == (0, 32, 8, 8)


def test_non_finite_inputs_reach_the_outputs_they_touch(ext):
    """An inf in x makes inf or NaN only where the convolution reads it (the 3x3 window around
    it), as oneDNN's does: the padding columns the kernel adds never carry it elsewhere."""
    x = torch.zeros(1, 16, 6, 6)
    x[0, 0, 2, 5] = float("inf")  # the last column: next to the shared zero column
    x = x.bfloat16().contiguous(memory_format=CL)
    out = ext.conv3x3_forward(x, torch.ones(16, 16, 3, 3).bfloat16())
    touched = torch.zeros(6, 6, dtype=torch.bool)
    touched[1:4, 4:6] = True
    assert (~torch.isfinite(out[0])).all(0).eq(touched).all()
    assert torch.isfinite(out[0][:, ~touched]).all()


@pytest.mark.parametrize("ci,co,side", [(16, 16, 32), (16, 32, 9), (32, 32, 16), (64, 64, 8)])
@pytest.mark.parametrize("transposed", [False, True])
def test_add_gives_the_bits_of_adding_after_the_convolution(ext, ci, co, side, transposed):
    """conv3x3_forward(x, w, add=r) is the convolution stored in bf16, then r added as torch's bf16
    add does it (and the extension's own add): the same bits, including subnormal sums (which
    the CPU's bf16 conversion would flush), infinities and NaN. The shapes take each of the
    kernel's accumulator layouts (16, 32 and 64 output channels a group)."""
    g = torch.Generator().manual_seed(ci + co + side)
    x = torch.randn(3, ci, side, side, generator=g).bfloat16().contiguous(memory_format=CL)
    w = (
        torch.randn(ci, co, 3, 3, generator=g)
        if transposed
        else torch.randn(co, ci, 3, 3, generator=g)
    )
    w = w.bfloat16()
    out_c = co  # transposed: w is [x.size(1), result channels, 3, 3]
    r = torch.randn(3, out_c, side, side, generator=g)
    r[0, :, 0, 0] = torch.tensor([float("inf"), float("nan"), 1e-39, -1e-39] * (out_c // 4))
    r = r.bfloat16().contiguous(memory_format=CL)
    conv = ext.conv3x3_forward(x, w, transposed)
    fused = ext.conv3x3_forward(x, w, transposed, add=r)
    assert fused.shape == conv.shape and fused.is_contiguous(memory_format=CL)
    expected = conv + r
    same = (fused.view(torch.int16) == expected.view(torch.int16)) | (
        fused.isnan() & expected.isnan()
    )
    assert bool(same.all())
    assert torch.equal(fused.view(torch.int16), ext.add(conv, r).view(torch.int16))
    # subnormal values pass through the sum unchanged (a convolution of zeros adds 0)
    tiny = torch.full_like(r, 1e-39).contiguous(memory_format=CL)
    assert tiny.float().abs().min() > 0
    through = ext.conv3x3_forward(torch.zeros_like(x), w, transposed, add=tiny)
    assert torch.equal(through.view(torch.int16), tiny.view(torch.int16))


def _mask_bits(keep: torch.Tensor) -> torch.Tensor:
    """bn_act.cpp's ReLU mask of a channels_last tensor: int16, bit b of word k for the value at
    offset 16 k + b in memory (NHWC) order."""
    flat = keep.permute(0, 2, 3, 1).reshape(-1, 16).to(torch.int32)
    words = (flat << torch.arange(16, dtype=torch.int32)).sum(1)
    return torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)


@pytest.mark.parametrize("ci,co,side", [(16, 16, 32), (32, 32, 16), (64, 64, 8)])
def test_add_mask_adds_only_the_kept_values(ext, ci, co, side):
    """add_mask: the block op's shortcut gradient, dout where bn2's ReLU passed it, added from
    dout and the mask bits: the bits of adding dout masked to zero after the convolution."""
    g = torch.Generator().manual_seed(side)
    x = torch.randn(2, ci, side, side, generator=g).bfloat16().contiguous(memory_format=CL)
    w = torch.randn(ci, co, 3, 3, generator=g).bfloat16()
    dout = torch.randn(2, co, side, side, generator=g).bfloat16().contiguous(memory_format=CL)
    keep = torch.rand(2, co, side, side, generator=g) < 0.5
    # _mask_bits is the layout of the fused BN+ReLU kernel's own mask
    c = torch.zeros(co)
    z, bits = ext.forward_train(dout, None, torch.ones(co), c, c.clone(), torch.ones(co),
                                torch.zeros((), dtype=torch.long), 0.1, 1e-5)[:2]  # fmt: skip
    assert torch.equal(bits, _mask_bits(z > 0))
    fused = ext.conv3x3_forward(x, w, True, add=dout, add_mask=_mask_bits(keep))
    masked = torch.where(keep, dout, torch.zeros_like(dout)).contiguous(memory_format=CL)
    expected = ext.conv3x3_forward(x, w, True) + masked
    assert torch.equal(fused.view(torch.int16), expected.view(torch.int16))
    everything = _mask_bits(torch.ones_like(keep))
    assert torch.equal(ext.conv3x3_forward(x, w, True, add=dout, add_mask=everything),
                       ext.conv3x3_forward(x, w, True, add=dout))  # fmt: skip
    with pytest.raises(RuntimeError, match="add_mask must be an int16"):
        ext.conv3x3_forward(x, w, True, add=dout, add_mask=_mask_bits(keep)[1:])
    with pytest.raises(RuntimeError, match="add_mask must be an int16"):
        ext.conv3x3_forward(x, w, True, add_mask=_mask_bits(keep))


def test_add_must_match_the_result(ext):
    x = torch.randn(2, 16, 4, 4).bfloat16().contiguous(memory_format=CL)
    w = torch.randn(16, 16, 3, 3).bfloat16()
    for bad in (torch.zeros(2, 16, 4, 4).bfloat16(), torch.zeros(2, 16, 4, 4).contiguous(memory_format=CL),
                torch.zeros(2, 16, 4, 5).bfloat16().contiguous(memory_format=CL)):  # fmt: skip
        with pytest.raises(RuntimeError, match="add must be a bf16 channels_last"):
            ext.conv3x3_forward(x, w, add=bad)


def test_bad_arguments_are_refused_with_a_message(ext):
    x = torch.randn(2, 16, 4, 4).bfloat16().contiguous(memory_format=CL)
    w = torch.randn(16, 16, 3, 3).bfloat16()
    with pytest.raises(RuntimeError, match="channels_last bf16"):
        ext.conv3x3_forward(x.contiguous(), w)
    with pytest.raises(RuntimeError, match="channels_last bf16"):
        ext.conv3x3_forward(x.float(), w)
    with pytest.raises(RuntimeError, match=r"bf16 \[out, in, 3, 3\]"):
        ext.conv3x3_forward(x, w.float())
    with pytest.raises(RuntimeError, match=r"bf16 \[out, in, 3, 3\]"):
        ext.conv3x3_forward(x, torch.randn(16, 16, 1, 1).bfloat16())
    with pytest.raises(RuntimeError, match="input channels"):
        ext.conv3x3_forward(x, torch.randn(16, 32, 3, 3).bfloat16())
    with pytest.raises(RuntimeError, match="stride 1 or 2, not 3"):
        ext.conv3x3_forward(x, w, stride=3)
    with pytest.raises(RuntimeError, match="add and add_mask are for stride 1"):
        ext.conv3x3_forward(x, w, add=torch.zeros(2, 16, 2, 2).bfloat16(), stride=2)
    with pytest.raises(RuntimeError, match="multiple of 32 channels"):
        ext.conv3x3_forward(x, w, transposed=True, stride=2)  # x: a 16-channel gradient
    x8 = torch.randn(2, 8, 4, 4).bfloat16().contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ext.conv3x3_forward(x8, torch.randn(16, 8, 3, 3).bfloat16())
