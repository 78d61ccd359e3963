"""Weight gradients over tiled images (models/tiled_wgrad.py) against the direct convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reslab.models import conv_wgrad, create_model, tiled_wgrad
from reslab.models.tiled_wgrad import (
    _TiledWgradConv,
    apply_conv,
    tile_factor,
    tile_images,
    use_tiled_wgrad,
)
from reslab.runtime.precision import bf16_is_fast

CL = torch.channels_last

NATIVE_BF16 = bf16_is_fast(torch.device("cpu"))  # AVX512-BF16 or AMX: not emulated


@pytest.fixture
def amx(monkeypatch):
    """Tiling on whatever this CPU is (the rule is per CPU kind; the math is not), and not the
    AMX kernel, which comes first where it applies (tests/models/test_conv_wgrad.py)."""
    monkeypatch.setattr(tiled_wgrad, "_amx", lambda: True)
    monkeypatch.setattr(conv_wgrad, "usable", lambda *a: False)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 35), t=st.integers(2, 4), h=st.integers(1, 9), w=st.integers(1, 9))
def test_every_image_lands_on_its_tile_and_everything_else_is_zero(n, t, h, w):
    x = (torch.arange(n * 3 * h * w, dtype=torch.float32).view(n, 3, h, w) + 1).contiguous(
        memory_format=CL
    )
    out = tile_images(x, t)
    assert out.shape == (-(-n // (t * t)), 3, t * (h + 1) - 1, t * (w + 1) - 1)
    assert out.is_contiguous(memory_format=CL)
    mask = torch.zeros_like(out, dtype=torch.bool)
    for i in range(n):
        b, (r, c) = i // (t * t), divmod(i % (t * t), t)
        tile = (
            b,
            slice(None),
            slice(r * (h + 1), r * (h + 1) + h),
            slice(c * (w + 1), c * (w + 1) + w),
        )
        assert torch.equal(out[tile], x[i])
        mask[tile] = True
    assert not out[~mask].any()  # gaps and empty tiles


@pytest.mark.parametrize("n", [1, 5, 16, 33])
@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("h", [4, 7, 8])
def test_tiled_gradients_equal_the_direct_ones_in_float64(n, t, h):
    g = torch.Generator().manual_seed(n * 100 + t * 10 + h)
    x = torch.randn(n, 16, h, h, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    w = torch.randn(24, 16, 3, 3, generator=g, dtype=torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    y = F.conv2d(x, w, padding=1)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y2 = _TiledWgradConv.apply(x, w, t)
    dx2, dw2 = torch.autograd.grad(y2, (x, w), dy)
    assert torch.equal(y2, y)
    torch.testing.assert_close(dx2, dx, rtol=0, atol=1e-12)
    torch.testing.assert_close(dw2, dw, rtol=1e-12, atol=1e-10)  # another summation order


def _conv(c: int = 64) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=CL)


def _x(n: int, c: int, h: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(n, c, h, h).to(dtype).contiguous(memory_format=CL)


def test_tiling_is_taken_only_where_it_was_measured_faster(amx):
    conv = _conv()
    assert tile_factor(conv, _x(128, 64, 8)) == 4
    assert tile_factor(conv, _x(128, 64, 6)) == 4
    assert tile_factor(conv, _x(8, 64, 8)) == 2  # fewer images than a 4x4 canvas holds
    assert tile_factor(conv, _x(3, 64, 8)) == 0
    assert tile_factor(_conv(256), _x(32, 256, 14)) == 2
    assert tile_factor(_conv(32), _x(128, 32, 12)) == 0  # x0.69-1.19: not worth it
    assert tile_factor(_conv(16), _x(128, 16, 32)) == 0  # slower on large maps
    assert tile_factor(conv, _x(128, 64, 8, torch.float32)) == 0  # measured slower in fp32
    assert tile_factor(conv, _x(128, 64, 8).contiguous()) == 0  # NCHW
    strided = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
    assert tile_factor(strided, _x(128, 64, 8)) == 0
    assert tile_factor(nn.Conv2d(64, 64, 3, padding=1), _x(128, 64, 8)) == 0  # bias
    with torch.no_grad():
        assert tile_factor(conv, _x(128, 64, 8)) == 0  # no gradient to compute
    conv.register_forward_hook(lambda *a: None)
    assert tile_factor(conv, _x(128, 64, 8)) == 0  # the hook must run


def test_no_tiling_without_amx(monkeypatch):
    monkeypatch.setattr(tiled_wgrad, "_amx", lambda: False)
    assert tile_factor(_conv(), _x(128, 64, 8)) == 0
    assert tiled_wgrad.status("bf16").startswith("direct")


def test_under_autocast_output_is_the_direct_one_and_the_gradient_bf16_close(amx):
    torch.manual_seed(0)
    conv = _conv()
    x = _x(64, 64, 8)
    with torch.autocast("cpu", torch.bfloat16):
        y = apply_conv(conv, x, tiled=True)
        ref = conv(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    (dw,) = torch.autograd.grad(y, conv.weight, dy)
    (dw_ref,) = torch.autograd.grad(ref, conv.weight, dy)
    assert dw.dtype == torch.float32  # back through autocast's cast to the fp32 parameter
    # The same sum in float64 of the bf16 operands that both paths multiplied.
    w64 = conv.weight.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.conv2d(x.bfloat16().double(), w64, padding=1)
    (dw64,) = torch.autograd.grad(y64, w64, dy.double())
    top = dw64.abs().max()
    if NATIVE_BF16:
        # Native bf16 (AVX-512 BF16, AMX): both are fp32 sums rounded once to bf16, so they are
        # one bf16 unit of the largest entry apart at most.
        assert (dw - dw_ref).abs().max() <= dw_ref.abs().max() * 2**-7
    # Without it (e.g. AMD Zen 3) oneDNN's emulated bf16 weight gradient is ~2% off float64
    # either way (measured: 0.0168 of the largest entry for both paths), so there tiling must
    # only be no further from float64 than the direct path.
    err, err_ref = ((d.double() - dw64).abs().max() / top for d in (dw, dw_ref))
    assert err <= max(1.25 * err_ref, 2**-7)


# Tiling is a bf16 path of CPUs with AMX. Where bf16 is only emulated (e.g. AMD Zen 3: a step
# runs 12x slower than fp32) the ImageNet nets' checks cost 30 s of the default run's 15 minutes
# and check a path such a CPU never takes: there the CIFAR nets carry the check.
_EMULATED = pytest.mark.skipif(not NATIVE_BF16, reason="bf16 is emulated on this CPU")


@pytest.mark.parametrize(
    "name",
    ["resnet20", "plain20", pytest.param("resnet18", marks=_EMULATED),
     pytest.param("resnet50", marks=_EMULATED)],
)  # fmt: skip
def test_a_bf16_training_step_with_tiling_matches_the_direct_one(name, amx):
    """Whole models at a size where their last stage is tiled: every parameter gets a finite
    gradient and the gradients are the direct ones to bf16 rounding."""
    torch.manual_seed(0)
    size = 32 if name in ("resnet20", "plain20") else 64  # 8x8 / 4x4 and 2x2 last stages
    model = create_model(name, num_classes=10).to(memory_format=CL)
    x = torch.randn(16, 3, size, size).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))

    def grads(on: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        use_tiled_wgrad(model, on)
        with torch.autocast("cpu", torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    direct, tiled = grads(False), grads(True)
    assert all(torch.isfinite(g).all() for g in tiled.values())
    differs = [n for n in tiled if not torch.equal(tiled[n], direct[n])]
    assert differs, "no weight gradient was tiled"
    # The same gradient, bf16 sums in another order: 2% of the largest entry where the CPU has
    # native bf16; oneDNN's emulated bf16 (e.g. AMD Zen 3) is ~2% off float64 by itself (see the
    # test above), so two such sums may be twice that apart.
    tol = 0.02 if NATIVE_BF16 else 0.05
    for n in tiled:
        scale = direct[n].abs().max()
        assert (tiled[n] - direct[n]).abs().max() <= tol * scale + 1e-6, n


@pytest.mark.parametrize(("name", "n"), [("resnet20", 9), ("resnet18", 8), ("resnet50", 16)])
def test_every_block_takes_the_flag(name, n):
    assert use_tiled_wgrad(create_model(name)) == n
