"""The AMX weight-gradient kernel (models/conv_wgrad.py, kernels/conv_wgrad.cpp) against float64
and oneDNN. Its own tests need a CPU with AMX (skipped elsewhere: the kernel is not built there);
`usable`'s rules are checked everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reslab.models import conv_wgrad, create_model, tiled_wgrad
from reslab.models.bn_act import load_kernel
from reslab.models.tiled_wgrad import apply_conv, use_tiled_wgrad, wgrad_path

CL = torch.channels_last
_ARGS = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """The kernel on the small batches these tests use (it declines fewer than 16 images a
    thread, where it measured slower: test_it_declines_batches_that_leave_threads_idle)."""
    monkeypatch.setattr(conv_wgrad, "_BLOCK", 1)


def _pair(n, ci, co, h, w, *, ints=False, seed=0, stride=1):
    """(x [n, ci, h, w], dy [n, co, h / stride, w / stride]) bf16 channels_last; small integers
    where `ints`, so that every product and sum is exact in fp32 and the kernel must equal
    float64 exactly."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = h // stride, w // stride
    if ints:
        x = torch.randint(-3, 4, (n, ci, h, w), generator=g).float()
        dy = torch.randint(-3, 4, (n, co, ho, wo), generator=g).float()
    else:
        x, dy = torch.randn(n, ci, h, w, generator=g), torch.randn(n, co, ho, wo, generator=g)
    return (x.bfloat16().contiguous(memory_format=CL), dy.bfloat16().contiguous(memory_format=CL))


def _reference(x, dy, stride=1):
    """The weight gradient in float64 (torch's own convolution backward)."""
    w = torch.zeros(dy.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    args = ((stride, stride), *_ARGS[1:])
    return torch.ops.aten.convolution_backward(
        dy.double(), x.double(), w, None, *args, [False, True, False]
    )[1]


@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 16, 1, 2),  # one row of two pixels: every tap reads padding somewhere
        (3, 16, 16, 5, 6),  # 30 pixels: one tile row, partly padding
        (17, 32, 16, 9, 10),  # a second block of 16 images, 90 pixels (3 rows of 32, 6 spare)
        (16, 16, 48, 4, 32),  # a row is a tile row; 3 output blocks
        (2, 16, 16, 3, 34),  # rows longer than a tile row and not a multiple of 32
        (1, 16, 16, 2, 64),  # two tile rows per image row
        (35, 64, 64, 8, 8),  # CIFAR stage 3
        (2, 128, 112, 3, 4),  # the largest channel counts it is used for; 7 output blocks
    ],
)
def test_the_kernel_equals_float64_exactly_on_exact_data(ext, shape):
    """Integer data: no rounding anywhere, so any misplaced or missing term (a tap's row ends,
    the padding, a channel block, an image) shows as a difference."""
    x, dy = _pair(*shape, ints=True)
    got = ext.conv3x3_wgrad(x, dy)
    assert got.dtype == torch.float32 and got.shape == (shape[2], shape[1], 3, 3)
    assert got.is_contiguous()
    assert torch.equal(got.double(), _reference(x, dy))


@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 16, 2, 4),  # a 1x2 output
        (3, 16, 32, 4, 4),
        (17, 32, 16, 6, 8),  # a second block of images
        (2, 16, 32, 32, 32),  # CIFAR's first transition, 32x32 -> 16x16
        (5, 64, 64, 8, 12),
        (3, 16, 16, 2, 68),  # output rows longer than a tile row
    ],
)
def test_stride_2_equals_float64_exactly_on_exact_data(ext, shape):
    """Stride 2 reads x's four phases (even/odd rows and columns), the kw = 0 taps with the
    previous column: the same exactness test."""
    x, dy = _pair(*shape, ints=True, stride=2)
    got = ext.conv3x3_wgrad(x, dy, 2)
    assert got.shape == (shape[2], shape[1], 3, 3)
    assert torch.equal(got.double(), _reference(x, dy, 2))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 20),
    ci=st.sampled_from([16, 32, 48]),
    co=st.sampled_from([16, 32]),
    h=st.integers(1, 12),
    half_w=st.integers(1, 20),
    stride=st.sampled_from([1, 2]),
)
def test_any_shape_it_takes_equals_float64_exactly(n, ci, co, h, half_w, stride):
    if not conv_wgrad.available():
        pytest.skip("the AMX kernel does not run on this CPU")
    h, w = stride * h, stride * 2 * half_w  # the output: h x 2 half_w
    x, dy = _pair(n, ci, co, h, w, ints=True, seed=n * h + half_w, stride=stride)
    got = load_kernel().conv3x3_wgrad(x, dy, stride).double()
    assert torch.equal(got, _reference(x, dy, stride))


@pytest.mark.parametrize("shape", [(128, 16, 16, 32, 32), (64, 32, 32, 16, 16), (40, 64, 64, 8, 8)])
def test_on_real_valued_data_it_is_fp32_accurate_and_within_bf16_of_onednn(ext, shape):
    x, dy = _pair(*shape)
    got, ref = ext.conv3x3_wgrad(x, dy).double(), _reference(x, dy)
    scale = _reference(x.abs(), dy.abs())  # the sum of the terms' magnitudes
    assert ((got - ref).abs() <= scale * 2**-16).all()  # fp32 sums: far below bf16's 2^-8
    w = torch.zeros(shape[2], shape[1], 3, 3, dtype=torch.bfloat16)
    onednn = torch.ops.aten.convolution_backward(dy, x, w, None, *_ARGS, [False, True, False])[1]
    # oneDNN rounds its sums to bf16: half a bf16 unit of each entry, plus its own fp32 error
    assert ((onednn.double() - got).abs() <= got.abs() * 2**-8 + scale * 2**-16).all()


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    ci=st.sampled_from([16, 32, 64]),
    co=st.sampled_from([16, 48, 64]),
    h=st.integers(1, 10),
    half_w=st.integers(1, 8),
    stride=st.sampled_from([1, 2]),
)
def test_the_bf16_channels_last_output_is_the_fp32_one_rounded_and_reordered(
    n, ci, co, h, half_w, stride
):
    """What a training step takes (the bf16 weight's dtype and layout, written by the kernel):
    the same bits as rounding the fp32 result with torch's conversion and reordering it (for
    numbers: a NaN may be stored with other bits than torch's)."""
    if not conv_wgrad.available():
        pytest.skip("the AMX kernel does not run on this CPU")
    h, w = stride * h, stride * 2 * half_w
    x, dy = _pair(n, ci, co, h, w, seed=n + ci + h, stride=stride)  # real-valued: rounding
    ext = load_kernel()
    got = ext.conv3x3_wgrad(x, dy, stride, bf16_channels_last=True)
    want = ext.conv3x3_wgrad(x, dy, stride).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=CL)
    assert got.shape == want.shape and torch.equal(got, want)


def test_a_step_takes_the_bf16_output_straight_from_the_kernel(ext):
    """weight_grad for a bf16 channels_last weight (autocast's cast of a channels_last model's
    fp32 weight): the kernel's own bf16 output, no conversion or copy after it."""
    x, dy = _pair(32, 16, 32, 8, 8, seed=5)
    w = torch.zeros(32, 16, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=CL)
    with torch.no_grad():
        got = conv_wgrad.weight_grad(x, dy, w, 1)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=CL)
    assert torch.equal(got, ext.conv3x3_wgrad(x, dy).to(torch.bfloat16))
    with torch.no_grad():  # an fp32 contiguous weight: the fp32 sums in its dtype and layout
        got32 = conv_wgrad.weight_grad(x, dy, torch.zeros(32, 16, 3, 3), 1)
    assert got32.is_contiguous() and torch.equal(got32, ext.conv3x3_wgrad(x, dy))


def test_an_empty_batch_gives_a_zero_gradient(ext):
    """No images: the sum is empty (the output is allocated uninitialised and filled by the
    taps, so this case must zero it; it used to read an empty buffer)."""
    x = torch.zeros(0, 16, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=CL)
    for cl in (False, True):
        dw = ext.conv3x3_wgrad(x, x, 1, bf16_channels_last=cl)
        assert dw.shape == (16, 16, 3, 3) and not dw.any()


def test_the_result_does_not_depend_on_the_number_of_threads(ext):
    x, dy = _pair(50, 32, 32, 8, 8, seed=3)  # 4 blocks of up to 16 images
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.conv3x3_wgrad(x, dy)
        one16 = ext.conv3x3_wgrad(x, dy, bf16_channels_last=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ext.conv3x3_wgrad(x, dy))
    assert torch.equal(one16, ext.conv3x3_wgrad(x, dy, bf16_channels_last=True))


def test_bad_arguments_are_refused_with_a_message(ext):
    x, dy = _pair(2, 16, 16, 4, 4)
    with pytest.raises(RuntimeError, match="width must be even"):
        ext.conv3x3_wgrad(
            x[..., :3].contiguous(memory_format=CL), dy[..., :3].contiguous(memory_format=CL)
        )
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ext.conv3x3_wgrad(x[:, :8].contiguous(memory_format=CL), dy)
    with pytest.raises(RuntimeError, match="channels_last bf16"):
        ext.conv3x3_wgrad(x.float(), dy)
    with pytest.raises(RuntimeError, match="channels_last bf16"):
        ext.conv3x3_wgrad(x.contiguous(), dy)
    with pytest.raises(RuntimeError, match="must be"):
        ext.conv3x3_wgrad(x, dy[:1])
    with pytest.raises(RuntimeError, match="must be"):
        ext.conv3x3_wgrad(x, dy, 2)  # dy is not x's size halved
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        ext.conv3x3_wgrad(x, dy[:, :, :1, :1].contiguous(memory_format=CL), 4)


def test_it_declines_batches_that_leave_threads_idle(monkeypatch):
    monkeypatch.setattr(conv_wgrad, "available", lambda: True)
    monkeypatch.setattr(conv_wgrad, "_BLOCK", 16)
    threads = torch.get_num_threads()
    assert conv_wgrad.usable(_pair(16 * threads, 16, 16, 4, 4)[0], 16)
    assert not conv_wgrad.usable(_pair(16 * threads - 1, 16, 16, 4, 4)[0], 16)


def test_usable_only_where_the_kernel_applies(monkeypatch):
    monkeypatch.setattr(conv_wgrad, "available", lambda: True)
    good, _ = _pair(4, 16, 32, 6, 6)
    assert conv_wgrad.usable(good, 32)
    assert not conv_wgrad.usable(good.float(), 32)
    assert not conv_wgrad.usable(good.contiguous(), 32)  # NCHW
    assert not conv_wgrad.usable(good[..., :5].contiguous(memory_format=CL), 32)  # odd width
    assert not conv_wgrad.usable(good, 24)  # output channels not a multiple of 16
    assert not conv_wgrad.usable(_pair(1, 8, 16, 4, 4)[0], 16)
    big = _pair(1, 256, 16, 4, 4)[0]
    assert not conv_wgrad.usable(big, 16)  # measured slower than oneDNN at 256 channels
    assert not conv_wgrad.usable(good[:0], 32)  # no images
    assert conv_wgrad.usable(_pair(2, 16, 32, 8, 12)[0], 32, 2)  # 4x6 output
    assert not conv_wgrad.usable(good, 32, 2)  # a 3x3 output: odd width
    assert not conv_wgrad.usable(_pair(2, 16, 32, 7, 8)[0], 32, 2)  # odd input height
    assert not conv_wgrad.usable(good, 32, 3)
    monkeypatch.setattr(conv_wgrad, "available", lambda: False)
    assert not conv_wgrad.usable(good, 32)


def test_apply_conv_takes_the_kernels_under_autocast_with_oneDNNs_output_and_input_gradient(ext):
    """Stride 1: the output and input gradient from the AMX convolution (conv_fwd.cpp), which sums
    the same products in fp32 and rounds once as oneDNN does: at most one bf16 step apart (here
    the same bits); the weight gradient from the weight-gradient kernel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False).to(memory_format=CL)
    x = torch.randn(24, 32, 16, 16).bfloat16().contiguous(memory_format=CL).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        assert wgrad_path(conv, x) == "kernel"
        y = apply_conv(conv, x, tiled=True)
        ref = conv(x)
    assert "AmxWgradConv" in type(y.grad_fn).__name__
    assert y.dtype == ref.dtype and y.is_contiguous(memory_format=CL)
    assert ((y - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, conv.weight), dy)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, conv.weight), dy)
    assert ((dx - dx_ref).abs() <= dx_ref.abs() * 2**-7 + 1e-6).all()
    assert dw.dtype == torch.float32 and dw.shape == conv.weight.shape
    assert (dw - dw_ref).abs().max() <= dw_ref.abs().max() * 2**-7  # both rounded once to bf16


def test_with_the_forward_kernel_off_the_output_and_input_gradient_are_onednns(ext, monkeypatch):
    """conv_wgrad.FORWARD_KERNEL = False (benchmarks compare with it) leaves oneDNN's bits."""
    monkeypatch.setattr(conv_wgrad, "FORWARD_KERNEL", False)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).to(memory_format=CL)
    x = torch.randn(16, 16, 12, 12).bfloat16().contiguous(memory_format=CL).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y, ref = apply_conv(conv, x, tiled=True), conv(x)
    assert "AmxWgradConv" in type(y.grad_fn).__name__
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])


def test_double_backward_through_the_kernel_path_is_autograd_s(ext):
    """create_graph=True: the weight gradient must stay differentiable (a gradient penalty), so
    the kernel steps aside for oneDNN's op; the second derivative equals the direct path's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).to(memory_format=CL)
    x = torch.randn(4, 16, 8, 8).bfloat16().contiguous(memory_format=CL).requires_grad_()

    def penalty(tiled: bool) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            y = apply_conv(conv, x, tiled=tiled)
        (dw,) = torch.autograd.grad(y.float().square().sum(), conv.weight, create_graph=True)
        (g,) = torch.autograd.grad(dw.square().sum(), x)
        return g

    assert torch.equal(penalty(True), penalty(False))


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18"])
def test_a_training_step_with_the_kernel_matches_the_direct_one(ext, name, monkeypatch):
    """Whole models: the kernel computes every 3x3 weight gradient it takes (counted), every
    parameter gets a finite gradient, within bf16 rounding of oneDNN's where the forward pass is
    oneDNN's too. With the AMX convolution's forward pass and input gradient (conv_fwd.cpp) the
    activations round differently, and at initialisation a bf16 step's gradients of the early
    layers are 20-100% of their size away from fp32's whichever kernels compute them: there the
    check is that the kernels' step is as close to fp32's as oneDNN's."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(memory_format=CL)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))
    calls, convs = [], []

    class Counting:
        def conv3x3_wgrad(self, a, b, stride=1, **kw):
            calls.append((tuple(a.shape), stride))
            return ext.conv3x3_wgrad(a, b, stride, **kw)

        def conv3x3_forward(self, a, w, transposed=False, stride=1):
            convs.append((transposed, stride))
            return ext.conv3x3_forward(a, w, transposed, stride=stride)

    monkeypatch.setattr(conv_wgrad, "load_kernel", lambda: Counting())
    monkeypatch.setattr(conv_wgrad, "available", lambda: True)

    def grads(on: bool, forward_kernel: bool = False, bf16: bool = True) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(conv_wgrad, "FORWARD_KERNEL", forward_kernel)
        model.zero_grad(set_to_none=True)
        use_tiled_wgrad(model, on)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            F.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    direct, kernel = grads(False), grads(True)
    assert not convs
    # the blocks' 3x3 convs (not the stem: 3 channels), ResNet-18's up to 128 channels; the
    # stride-2 ones (2, 2, 1) through option A's combined op in ResNet-20, directly elsewhere
    eligible = {"resnet20": 18, "plain20": 18, "resnet18": 8}[name]
    assert len(calls) == eligible
    assert sum(s == 2 for _, s in calls) == (1 if name == "resnet18" else 2)
    for n, g in kernel.items():
        assert torch.isfinite(g).all(), n
        scale = direct[n].abs().max()
        assert (g - direct[n]).abs().max() <= scale * 0.05 + 1e-6, n  # bf16 steps apart
    # their forward and input gradient from the AMX convolution (conv_fwd.cpp), the stride-2
    # ones' too up to 64 output channels (ResNet-18's has 128: oneDNN's)
    stride2 = 1 if name == "resnet18" else 2
    fp32, both = grads(False, bf16=False), grads(True, forward_kernel=True)
    for transposed in (False, True):
        assert convs.count((transposed, 1)) == eligible - stride2
        assert convs.count((transposed, 2)) == (0 if name == "resnet18" else stride2)
    assert all(torch.isfinite(g).all() for g in both.values())

    def distance(g: dict[str, torch.Tensor]) -> float:  # to fp32's, relative, over all weights
        return sum(((g[n] - r).norm() / r.norm()).item() for n, r in fp32.items()) / len(fp32)

    assert distance(both) <= distance(direct) * 1.25


def test_stride_2_takes_the_kernel_where_it_was_measured_faster(monkeypatch):
    """Stride 2's output and input gradient: the kernel's up to STRIDE2_MAX_CHANNELS output
    channels (a CIFAR net's transitions), the input gradient for 32k of them; oneDNN's beyond
    (x0.95-0.97 at ResNet-18's 64 -> 128); the switches turn each off."""
    dy = {c: torch.zeros(1, c, 2, 2) for c in (16, 32, 64, 128)}
    assert conv_wgrad._fwd_kernel(2, 32) and conv_wgrad._fwd_kernel(2, 64)
    assert not conv_wgrad._fwd_kernel(2, 128)
    with torch.no_grad():  # a backward's input gradient runs without grad mode
        assert conv_wgrad._dgrad_kernel(2, dy[32]) and conv_wgrad._dgrad_kernel(2, dy[64])
        assert not conv_wgrad._dgrad_kernel(2, dy[16]) and not conv_wgrad._dgrad_kernel(2, dy[128])
        assert conv_wgrad._dgrad_kernel(1, dy[16]) and conv_wgrad._dgrad_kernel(1, dy[128])
        monkeypatch.setattr(conv_wgrad, "STRIDE2_FORWARD", False)
        monkeypatch.setattr(conv_wgrad, "STRIDE2_INPUT_GRAD", False)
        assert not conv_wgrad._fwd_kernel(2, 32) and not conv_wgrad._dgrad_kernel(2, dy[32])
        assert conv_wgrad._fwd_kernel(1, 32) and conv_wgrad._dgrad_kernel(1, dy[32])
    assert not conv_wgrad._dgrad_kernel(1, dy[32])  # create_graph: oneDNN's differentiable op


def test_the_banner_names_the_kernel_where_it_runs(monkeypatch):
    monkeypatch.setattr(tiled_wgrad, "_amx", lambda: True)
    monkeypatch.setattr(conv_wgrad, "available", lambda: True)
    assert tiled_wgrad.status("bf16").startswith(
        "AMX kernel (16-128 channels, even widths; outputs and input gradients too)"
    )
    monkeypatch.setattr(conv_wgrad, "FORWARD_KERNEL", False)
    assert tiled_wgrad.status("bf16").startswith("AMX kernel (16-128 channels, even widths)")
    monkeypatch.setattr(conv_wgrad, "available", lambda: False)
    assert tiled_wgrad.status("bf16").startswith("tiled")
    assert tiled_wgrad.status("fp32").startswith("direct")


def test_a_conv_with_any_hook_calling_it_would_run_takes_neither_path(monkeypatch):
    """The kernel and tiled paths do not call the module: a backward pre-hook of the conv, or a
    global module hook, must keep it on the direct path, as its own forward hooks do."""
    monkeypatch.setattr(conv_wgrad, "available", lambda: True)
    x = _pair(4, 16, 16, 8, 8)[0].requires_grad_()

    def conv() -> nn.Conv2d:
        return nn.Conv2d(16, 16, 3, padding=1, bias=False).to(memory_format=CL)

    assert wgrad_path(conv(), x) == "kernel"
    hooked = conv()
    hooked.register_full_backward_pre_hook(lambda *a: None)
    assert wgrad_path(hooked, x) == ""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert wgrad_path(conv(), x) == ""
    finally:
        handle.remove()


def test_eval_mode_keeps_the_plain_conv_so_torch_func_works(monkeypatch):
    """A model in eval mode with the flag set (gradients of inputs: saliency maps, attacks)
    takes the plain conv: torch.func cannot run a custom autograd Function without
    setup_context."""
    monkeypatch.setattr(conv_wgrad, "available", lambda: True)
    model = create_model("resnet20", num_classes=10).to(memory_format=CL)
    use_tiled_wgrad(model)
    x = torch.randn(2, 16, 8, 8).bfloat16().contiguous(memory_format=CL)
    conv = model.layer1[0].conv1
    assert wgrad_path(conv, x) == "kernel"
    model.eval()
    assert wgrad_path(conv, x) == ""
    params = dict(model.named_parameters())
    image = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)

    def loss(p):
        with torch.autocast("cpu", torch.bfloat16):
            return torch.func.functional_call(model, p, (image,)).float().sum()

    grads = torch.func.grad(loss)(params)
    assert all(torch.isfinite(g).all() for g in grads.values())
