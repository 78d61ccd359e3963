"""Weight gradients of 3x3 convolutions on Intel AMX tiles (CPU, bf16): kernels/conv_wgrad.cpp.

oneDNN's bf16 weight gradient of a CIFAR ResNet's first-stage convolution (16 -> 16 channels,
32x32 maps, batch 128) runs at ~600 GFLOP/s on a 2-core Xeon whose AMX tiles multiply at ~6.4
TFLOP/s; of the last stage's (64 channels on 8x8) at ~550. The kernel lays each image out once
for the tiles (its output gradient transposed, its input in pixel pairs) and computes the nine
taps as tile products over the same data: 1.7-2.5x oneDNN's speed at those shapes
(benchmarks/ab_conv_wgrad.py). The same gradient summed in another order (fp32 sums, rounded
once to the weight's dtype as oneDNN's are; tests/models/test_conv_wgrad.py).

Used by `tiled_wgrad.apply_conv` for the blocks' 3x3 stride-1 convolutions in CPU training
(the `tiled_wgrad` flag), where `usable` holds: the kernel built with AMX and allowed by the OS,
bf16 channels_last input, channels multiples of 16 and at most `MAX_CHANNELS`, an even width.
The forward pass and the input gradient stay oneDNN's.
"""

from __future__ import annotations

import torch

from reslab.models.bn_act import load_kernel

_BACKWARD = torch.ops.aten.convolution_backward
_CONV_ARGS = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)  # stride, padding, dilation, ..., groups
# Measured faster than oneDNN up to here (batch 32: 64 channels on 56x56 x1.24, 128 on 28x28
# x1.11, 256 on 14x14 x0.91; benchmarks/ab_conv_wgrad.py).
MAX_CHANNELS = 128


def available() -> bool:
    """Whether the kernel runs here: built (on first use) with AMX, and the OS grants the
    process AMX's tile state. RESLAB_BN_KERNEL=0 turns it off with the fused kernel."""
    ext = load_kernel()
    return ext is not None and bool(ext.conv3x3_wgrad_available())


def usable(x: torch.Tensor, out_channels: int) -> bool:
    """Whether a 3x3 stride-1 padding-1 conv of x (checked by the caller) with `out_channels`
    can take the kernel's weight gradient."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4:
        return False
    n, c, h, w = x.shape
    if min(n, c, h, w) < 1 or w % 2 or c % 16 or out_channels % 16:
        return False
    if max(c, out_channels) > MAX_CHANNELS:
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and available()


class AmxWgradConv(torch.autograd.Function):
    """conv2d(x, weight) with 3x3 kernels, stride 1, padding 1 (bf16, channels_last); the
    weight gradient from the AMX kernel, the input gradient from oneDNN."""

    @staticmethod
    def forward(ctx, x, weight):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return torch.ops.aten.convolution(x, weight, None, *_CONV_ARGS)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _BACKWARD(dy, x, weight, None, *_CONV_ARGS, [True, False, False])[0]
        if ctx.needs_input_grad[1] and torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, double backward): the kernel's sum is not
            # differentiable, so the weight gradient comes from the op autograd can follow
            dw = _BACKWARD(dy, x, weight, None, *_CONV_ARGS, [False, True, False])[1]
        elif ctx.needs_input_grad[1]:
            # [Co, Ci, 3, 3] fp32 sums, rounded once to the weight's dtype (bf16 under autocast)
            dw = load_kernel().conv3x3_wgrad(x, dy).to(weight.dtype)
            dw = dw.contiguous(memory_format=torch.channels_last) if _cl(weight) else dw
        return dx, dw


def _cl(w: torch.Tensor) -> bool:
    """Whether a weight is stored channels_last (and not also contiguous, as 1x1 ones are)."""
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


__all__ = ["MAX_CHANNELS", "AmxWgradConv", "available", "usable"]
