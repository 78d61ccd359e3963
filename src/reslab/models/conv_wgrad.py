"""3x3 convolutions' weight gradients on Intel AMX tiles (CPU, bf16), kernels/conv_wgrad.cpp, and,
for stride 1, their outputs and input gradients too, kernels/conv_fwd.cpp.

oneDNN's bf16 weight gradient of a CIFAR ResNet's first-stage convolution (16 -> 16 channels,
32x32 maps, batch 128) runs at ~600 GFLOP/s on a 2-core Xeon whose AMX tiles multiply at ~6.4
TFLOP/s; of the last stage's (64 channels on 8x8) at ~550. The kernel lays each image out once
for the tiles (its output gradient transposed, its input in pixel pairs) and computes the nine
taps as tile products over the same data: 1.6-2.1x oneDNN's speed at those shapes, 1.35-2.1x at
the stride-2 transitions (benchmarks/ab_conv_wgrad.py, session 26). The same gradient summed in another order (fp32 sums, rounded
once to the weight's dtype as oneDNN's are; tests/models/test_conv_wgrad.py).

Used by `tiled_wgrad.apply_conv` for the blocks' 3x3 convolutions of stride 1 and 2 in CPU
training (the `tiled_wgrad` flag; option-A blocks' first conv through `layers.PadShortcut.
with_conv`), where `usable` holds: the kernel built with AMX and allowed by the OS, bf16
channels_last input, channels multiples of 16 and at most `MAX_CHANNELS`, an even output width
(and even input sides for stride 2). The forward pass and the input gradient of those of stride 1
come from kernels/conv_fwd.cpp (`FORWARD_KERNEL`): each image copied once into a zero-bordered
buffer, the nine taps as tile products over it (alone, with the operands evicted from L2 as in a
step: 1.3-1.4x oneDNN's speed at 16 channels on 32x32 and 32 on 16x16, 1.0-1.1x at 64 on 8x8; a
training step ResNet-20 x1.028, ResNet-56 x1.071: benchmarks/ab_conv_fwd.py, session 29); the
same sums in fp32, rounded once to bf16, so within one bf16 step of oneDNN's output
(tests/models/test_conv_fwd.py). Since session 37 those of stride 2 too (`STRIDE2_FORWARD`,
`STRIDE2_INPUT_GRAD`): the forward over x's even and odd rows in two buffers, the input gradient
as four phases (the output's even and odd rows and columns, each a stride-1 product over the
output gradient with 1, 2 or 4 of the taps); the input gradient where the output has a multiple
of 32 channels; both up to 64 output channels (a CIFAR net's transitions; oneDNN's was faster at
ImageNet's 128).
"""

from __future__ import annotations

import torch

from reslab.models.bn_act import load_kernel

_BACKWARD = torch.ops.aten.convolution_backward
# Measured faster than oneDNN up to here (batch 32: 64 channels on 56x56 x1.17-1.33, 128 on
# 28x28 x1.09-1.11, 256 on 14x14 x0.81-0.91; benchmarks/ab_conv_wgrad.py).
MAX_CHANNELS = 128
_BLOCK = 16  # images a thread sums at a time (kBlock in kernels/conv_wgrad.cpp)


def available() -> bool:
    """Whether the kernel runs here: built (on first use) with AMX, and the OS grants the
    process AMX's tile state. RESLAB_BN_KERNEL=0 turns it off with the fused kernel."""
    ext = load_kernel()
    return ext is not None and bool(ext.conv3x3_wgrad_available())


def usable(x: torch.Tensor, out_channels: int, stride: int = 1) -> bool:
    """Whether a 3x3 padding-1 conv of x with `stride` (1 or 2; the rest is checked by the
    caller) and `out_channels` can take the kernel's weight gradient: the output's width even,
    and for stride 2 the input's height and width even too."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4:
        return False
    n, c, h, w = x.shape
    if min(n, c, h, w) < 1 or c % 16 or out_channels % 16 or stride not in (1, 2):
        return False
    if (w // stride) % 2 or (stride == 2 and (h % 2 or w % 2)):
        return False
    if max(c, out_channels) > MAX_CHANNELS:
        return False
    if n < min_images():
        # The kernel shares images among threads in blocks of 16 (so that its sums do not depend
        # on the thread count): fewer images leave threads idle, and it measured slower than
        # oneDNN there (x0.63-0.70 at batch 8-16 on 2 threads, ResNet-18 layer1/2 shapes).
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and available()


def min_images() -> int:
    """The fewest images `usable` takes: 16 a thread (kernels/conv_wgrad.cpp's kBlock)."""
    return _BLOCK * torch.get_num_threads()


def conv_args(stride: int) -> tuple:
    """aten.convolution's arguments after the bias for a 3x3 padding-1 conv with `stride`."""
    return ((stride, stride), (1, 1), (1, 1), False, (0, 0), 1)


def weight_grad(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, stride: int):
    """conv2d(x, weight, stride, padding 1)'s weight gradient for the output gradient dy, in
    weight's dtype and layout: the kernel's fp32 sums rounded once (as oneDNN rounds its own);
    oneDNN's differentiable op under create_graph=True (grad mode on in a backward: a gradient
    penalty, double backward), which the kernel's sum is not."""
    if torch.is_grad_enabled():
        return _BACKWARD(dy, x, weight, None, *conv_args(stride), [False, True, False])[1]
    if weight.dtype == torch.bfloat16 and _cl(weight):  # a training step's (autocast's cast)
        return load_kernel().conv3x3_wgrad(x, dy, stride, bf16_channels_last=True)
    dw = load_kernel().conv3x3_wgrad(x, dy, stride).to(weight.dtype)
    return dw.contiguous(memory_format=torch.channels_last) if _cl(weight) else dw


# Stride-1 outputs and input gradients from kernels/conv_fwd.cpp; False: oneDNN's (benchmarks
# compare the two). On every CIFAR stage, even 8x8 maps where the kernel alone is no faster than
# oneDNN, a training step measured fastest with all of them (session 29).
FORWARD_KERNEL = True


# Stride 2's outputs and input gradients from kernels/conv_fwd.cpp too (since session 37; the
# block op's RESLAB_BLOCK_S2_FORWARD and RESLAB_BLOCK_S2_INPUT_GRAD builds take the same); False:
# oneDNN's. Alone at a CIFAR net's transitions (batch 128, 2-core Xeon with AMX): the input
# gradient x1.75-2.03 oneDNN's speed, the output x0.97-1.78 (benchmarks/ab_session37.py; a
# ResNet-20 step x1.025, session 37); at ResNet-18's
# 64 -> 128 on 56x56 (batch 32) x0.95 and x0.97: up to STRIDE2_MAX_CHANNELS output channels
# only (kernels/block.cpp's kStride2MaxChannels, the same).
STRIDE2_FORWARD = True
STRIDE2_INPUT_GRAD = True
STRIDE2_MAX_CHANNELS = 64


def _fwd_kernel(stride: int, out_channels: int) -> bool:
    if stride == 1:
        return FORWARD_KERNEL
    return FORWARD_KERNEL and STRIDE2_FORWARD and out_channels <= STRIDE2_MAX_CHANNELS


def _dgrad_kernel(stride: int, dy: torch.Tensor) -> bool:
    """The input gradient from the kernel: stride 1, or stride 2 with dy of 32k channels, up to
    STRIDE2_MAX_CHANNELS (the caller checked `usable`, which asks for even sides at stride 2)."""
    if not FORWARD_KERNEL or torch.is_grad_enabled():
        return False
    c = dy.shape[1]
    return stride == 1 or (STRIDE2_INPUT_GRAD and c % 32 == 0 and c <= STRIDE2_MAX_CHANNELS)


def output(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """conv2d(x, weight, stride, padding 1) where `usable` holds: the kernel's or oneDNN's."""
    if _fwd_kernel(stride, weight.shape[0]):
        return load_kernel().conv3x3_forward(x, weight, stride=stride)
    return torch.ops.aten.convolution(x, weight, None, *conv_args(stride))


def input_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int):
    """conv2d(x, weight, stride, padding 1)'s input gradient for dy (channels_last) where
    `usable` holds: the kernel's or oneDNN's (the differentiable op under create_graph)."""
    if _dgrad_kernel(stride, dy):
        return load_kernel().conv3x3_forward(dy, weight, transposed=True, stride=stride)
    return _BACKWARD(dy, x, weight, None, *conv_args(stride), [True, False, False])[0]


class AmxWgradConv(torch.autograd.Function):
    """conv2d(x, weight) with 3x3 kernels, padding 1, stride 1 or 2 (bf16, channels_last); the
    weight gradient from the AMX kernel; the output and the input gradient from the AMX
    convolution kernel too where `output` and `input_grad` take it, else from oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, stride=1):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return output(x, weight, stride)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(dy, x, weight, ctx.stride)
        if ctx.needs_input_grad[1]:
            dw = weight_grad(x, dy, weight, ctx.stride)
        return dx, dw, None


def _cl(w: torch.Tensor) -> bool:
    """Whether a weight is stored channels_last (and not also contiguous, as 1x1 ones are)."""
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


__all__ = [
    "MAX_CHANNELS",
    "STRIDE2_FORWARD",
    "STRIDE2_INPUT_GRAD",
    "STRIDE2_MAX_CHANNELS",
    "AmxWgradConv",
    "available",
    "conv_args",
    "input_grad",
    "output",
    "usable",
    "weight_grad",
]
