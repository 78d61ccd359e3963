"""Weight gradients of 3x3 convolutions in CPU training: the AMX kernel, or over tiled images.

`apply_conv` is how a flagged block (the `tiled_wgrad` flag, set for CPU runs) calls its 3x3
convolutions: their weight gradient comes from reslab's AMX kernel where it applies
(models/conv_wgrad.py: stride 1 or 2, 16-128 channels, even widths; session 26), else (stride 1)
over tiled images where the rule below takes the shape, else from oneDNN directly (`wgrad_path`
says which). The rest of this docstring is about tiling (session 21), which the kernel has since
replaced at CIFAR's shapes; it stays for the shapes the kernel does not take (odd widths such as
ResNet-18's 7x7 layer4, 256+ channels such as its 14x14 layer3).

oneDNN's bf16 weight gradient of a 3x3 convolution on small feature maps runs far below its
speed on larger maps on Intel Xeon with AMX: 64->64 channels on 8x8 maps at batch 128 (a CIFAR
ResNet's stage 3) at 200 GFLOP/s and on 6x6 maps (stage 3 of a 24 px batch) at 146, against
439 for 16->16 on 32x32 in the same run (2 cores, torch 2.14.1; benchmarks/ab_tiled_wgrad.py).
The same values laid out as fewer, larger images were 1.2-2.2x faster (batch 256 / 128,
results/cpu-kind/intel-amx-20261201/session21).

So the backward pass of such a convolution lays the images out on canvases, t x t images side by
side with one zero row or column between neighbours ([N, C, H, W] -> [ceil(N / t^2), C,
t(H+1)-1, t(W+1)-1]), and takes the weight gradient of the same convolution over the canvases.
With padding 1, a 3x3 window centred on an image pixel sees that image and zeros where the image
has its padding (a gap is the padding of both of its neighbours), and the output gradient is
zero on the gaps, so the canvas sum is the sum over the images: the same weight gradient,
summed in another order (equal in float64 to rounding, tests/models/test_tiled_wgrad.py). The
forward pass and the input gradient are computed as before (tiling did not speed them up).

Used where every condition of `tile_factor` holds: the block's `tiled_wgrad` flag (set by
`use_tiled_wgrad`, which the trainer calls for CPU runs), a weight gradient being recorded, a
plain 3x3 stride-1 padding-1 convolution without bias or hooks, a bf16 channels_last CPU input
on a CPU with AMX, and maps of at most 8x8 (t = 4) or at most 14x14 with 128+ channels (t = 2),
the shapes where it was measured faster. Not inside torch.compile or a trace.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from reslab.models import conv_wgrad
from reslab.models.layers import _hooked, set_block_flag

_BACKWARD = torch.ops.aten.convolution_backward
_STRIDES = ((1, 1), (2, 2))
_CONV_ARGS = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)  # stride, padding, dilation, ..., groups


@functools.cache
def _amx() -> bool:
    """Intel AMX tiles: the CPU kind on which tiling was measured faster. On AMD Zen 5's AVX-512
    bf16 (session 44, `benchmarks/ab_tiled_wgrad.py --force`) tiling lost in the training step
    (ResNet-20 and -56 at 32 and 24 px, median img/s of 150 rounds: tiled / direct x0.98-0.995), so
    CPUs without AMX keep the direct one."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def tile_images(x: torch.Tensor, t: int) -> torch.Tensor:
    """[N, C, H, W] channels_last -> [ceil(N / t^2), C, t(H+1)-1, t(W+1)-1] channels_last.

    Image n goes to canvas n // t^2, tile (i, j) = divmod(n % t^2, t), whose top-left pixel is
    (i (H+1), j (W+1)); every other value (the gaps, and the tiles of a last canvas that has fewer
    than t^2 images) is zero."""
    n, c, h, w = x.shape
    k = t * t
    m = -(-n // k)
    rows, cols = t * (h + 1) - 1, t * (w + 1) - 1
    out = x.new_empty(m, rows, cols, c)  # NHWC memory: channels_last once permuted back
    out[:, h :: h + 1].zero_()  # the gap rows and columns only: the tiles are written below
    out[:, :, w :: w + 1].zero_()
    src = x.permute(0, 2, 3, 1)  # [N, H, W, C], a view of channels_last memory
    tile_strides = (rows * cols * c, (h + 1) * cols * c, (w + 1) * c, cols * c, c, 1)
    full = n // k
    if n > full * k:  # a last canvas with empty tiles
        out[full:].zero_()
    if full:  # one copy for all whole canvases: [full, t, t, H, W, C]
        tiles = out.as_strided((full, t, t, h, w, c), tile_strides)
        tiles.copy_(src[: full * k].reshape(full, t, t, h, w, c))
    if n > full * k:  # the last canvas, image by image
        last = out[full:].as_strided((t, t, h, w, c), tile_strides[1:], full * rows * cols * c)
        for r in range(n - full * k):
            last[divmod(r, t)].copy_(src[full * k + r])
    return out.permute(0, 3, 1, 2)


class _TiledWgradConv(torch.autograd.Function):
    """conv2d(x, weight) with 3x3 kernels, stride 1, padding 1; the weight gradient over
    tile_images(.., t) of the input and of the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, t):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.t = t
        return torch.ops.aten.convolution(x, weight, None, *_CONV_ARGS)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _BACKWARD(dy, x, weight, None, *_CONV_ARGS, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            dyt, xt = tile_images(dy, ctx.t), tile_images(x, ctx.t)
            dw = _BACKWARD(dyt, xt, weight, None, *_CONV_ARGS, [False, True, False])[1]
        return dx, dw, None


def _plain_3x3(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` is a plain 3x3 padding-1 convolution of stride 1 or 2 of a bf16
    channels_last CPU tensor whose weight gradient is recorded and whose module runs no hooks:
    the case this module's weight-gradient paths are for (tiling: stride 1 only)."""
    if not isinstance(x, torch.Tensor):  # an fx Proxy: symbolic tracing records conv(x)
        return False
    if type(conv) is not nn.Conv2d or conv.bias is not None or conv.padding_mode != "zeros":
        return False
    if (conv.kernel_size, conv.padding) != ((3, 3), (1, 1)) or conv.stride not in _STRIDES:
        return False
    if conv.dilation != (1, 1) or conv.groups != 1:
        return False
    if _hooked(conv):  # its own hooks or global ones (a backward pre-hook too)
        return False  # these paths do not call the module, so its hooks would not run
    if not (conv.training and torch.is_grad_enabled() and conv.weight.requires_grad):
        # training only: in eval mode (saliency maps, attacks) torch.func transforms, which a
        # custom autograd Function without setup_context stops, keep working
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4:
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def tile_factor(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """Images per canvas side for `conv(x)`'s weight gradient; 0 for the direct computation."""
    if not _plain_3x3(conv, x) or conv.stride != (1, 1) or not _amx():
        return 0
    n, c, h, w = x.shape
    if h * w <= 64:
        t = 4  # 8x8: x1.17-1.36 (t = 2: x1.04-1.38); 6x6: x1.76-2.19 (t = 2: x1.39-1.42)
    elif h * w <= 196 and c >= 128:
        t = 2  # 14x14, 256 channels (ResNet-18/34 layer3 at 224 px): x1.14-1.52
    else:
        return 0  # 12x12 with 32 channels x0.69-1.19; 16x16 and larger x0.49-0.85
    while t > 1 and n < t * t:  # a canvas mostly of zeros costs more than it saves
        t //= 2
    return t if t > 1 else 0


def wgrad_path(conv: nn.Conv2d, x: torch.Tensor) -> str:
    """How a flagged block computes `conv(x)`'s weight gradient: "kernel" (AMX, models/
    conv_wgrad.py, first where it applies), "tiled" (over tiled images) or "" (directly)."""
    if not _plain_3x3(conv, x):
        return ""
    if conv_wgrad.usable(x, conv.out_channels, conv.stride[0]):
        return "kernel"
    return "tiled" if tile_factor(conv, x) else ""


def apply_conv(conv: nn.Conv2d, x: torch.Tensor, *, tiled: bool = False) -> torch.Tensor:
    """conv(x); with `tiled`, its weight gradient from the AMX kernel or over tiled images where
    `wgrad_path` finds one. The output is conv(x)'s own (the same op); only the weight
    gradient's summation order differs."""
    path = wgrad_path(conv, x) if tiled else ""
    if not path:
        return conv(x)
    weight = conv.weight
    if weight.dtype != x.dtype:
        if not torch.is_autocast_enabled("cpu") or weight.dtype == torch.float64:
            return conv(x)  # mixed dtypes outside autocast (or fp64, which autocast leaves)
        weight = weight.to(x.dtype)  # what autocast does for conv2d (the gradient flows back)
    with torch.autocast("cpu", enabled=False):
        if path == "kernel":
            return conv_wgrad.AmxWgradConv.apply(x, weight, conv.stride[0])
        return _TiledWgradConv.apply(x, weight, tile_factor(conv, x))


def use_tiled_wgrad(model: nn.Module, on: bool = True) -> int:
    """Set every block's `tiled_wgrad` flag; returns how many modules take it. The flag only
    chooses how a training step's weight gradients are summed: weights, outputs and state_dict
    stay the same."""
    return set_block_flag(model, "tiled_wgrad", on)


def status(precision: str) -> str:
    """One line for run banners: how flagged blocks compute their 3x3 weight gradients."""
    if precision != "bf16":
        return f"direct ({precision}: the AMX kernel and tiling are bf16 paths)"
    if not _amx():
        return "direct (the AMX kernel and tiling were measured faster only on CPUs with AMX)"
    tiled = "tiled on maps up to 8x8 (and up to 14x14 with 128+ channels)"
    if conv_wgrad.available():
        fwd = "; outputs and input gradients too" if conv_wgrad.FORWARD_KERNEL else ""
        return (f"AMX kernel (16-{conv_wgrad.MAX_CHANNELS} channels, even widths{fwd}), "
                f"else {tiled}")  # fmt: skip
    return tiled


__all__ = ["apply_conv", "status", "tile_factor", "tile_images", "use_tiled_wgrad", "wgrad_path"]
