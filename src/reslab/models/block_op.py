"""A BasicBlock as one autograd op in CPU training (kernels/block.cpp): relu(bn2(conv2(relu(bn1(
conv1(x))))) [+ shortcut(x)]) with the extension's kernels (the AMX convolutions of
models/conv_wgrad.py, the fused BN+ReLU of models/bn_act.py). Stride 1 with equal widths and the
identity shortcut (x's two gradients summed as conv1's input gradient is written), and, since
session 35, a stage's first block: conv1 of stride 2 (oneDNN's output and input gradient, the
AMX kernel's weight gradient) with option A's shortcut (x subsampled, zero channels padded;
section 3.3); plain blocks (no shortcut) of either kind too.

The same kernels on the same tensors as the block's per-op path with both CPU training flags
set, so the same bits (outputs, gradients, running statistics; tests/models/test_block_op.py);
what goes is the per-block Python and autograd bookkeeping: five autograd Functions, two weight
casts and their gradients' casts back, a dozen checks. On a 2-core Xeon with AMX that is
0.17-0.33 ms a block's forward + backward whatever the batch (one 16-channel block on 32 images
of 8x8: 0.64 -> 0.47 ms), ResNet-56's training step x1.065-1.093 and ResNet-20's x1.038-1.060
at batch 128 (two runs each; benchmarks/ab_block_op.py, session 30); the two transition blocks
as well (with option A's shortcut from one kernel pass, layers._pad_forward): ResNet-20 x1.043
(session 35). `forward` returns None wherever any condition below fails, and the block takes
its per-op path.

`infer` (session 39) is the same for evaluation: an eval-mode BasicBlock whose BatchNorms are
folded into its convolutions (the model `reslab eval` and a run's evaluations build) as two calls
of the AMX convolution kernel, each adding its bias (and, for conv2, the shortcut), applying the
ReLU and rounding once as it writes its output, where the eager ops write conv1's output, its
ReLU, conv2's output, the sum and its ReLU as five passes over memory.
"""

from __future__ import annotations

import torch
from torch import nn

from reslab.models import bn_act, conv_wgrad
from reslab.models.bn_act import load_kernel
from reslab.models.layers import PadShortcut, _hooked

# False: every block takes its per-op path (benchmarks compare the two).
ENABLED = True
# False: stride-2 blocks (a stage's first) take their per-op path (benchmarks/ab_block_op.py
# --transitions compares the two).
TRANSITIONS = True
# False: eval-mode blocks take oneDNN's fused convolutions (models/fused_eval.py) or their
# eager ops (benchmarks/ab_session39.py and ab_fused_eval.py compare them).
INFER = True


def _plain_conv(
    conv: nn.Module,
    channels: int,
    out: int | None = None,
    stride: int = 1,
    *,
    training: bool = True,
) -> bool:
    """A 3x3, padding-1 nn.Conv2d of `stride` from `channels` to `out` (`channels`) in training
    mode and bias-free, or (training=False) in eval mode with or without a bias (a BatchNorm
    folded into it)."""
    return (
        type(conv) is nn.Conv2d
        and conv.training == training
        and (conv.bias is None or not training)
        and conv.kernel_size == (3, 3)
        and conv.stride == (stride, stride)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels == channels
        and conv.out_channels == (channels if out is None else out)
    )


def _shortcut(block: nn.Module, c: int, planes: int) -> tuple[int, int, int] | None:
    """(stride, zero channels before x's, after) of the block's shortcut where the op computes
    it: stride 1 with the identity (or none, in a plain block); stride 2 with option A's
    subsampling and zero padding (or none). None for anything else (projections)."""
    sc = block.downsample if block.residual else None
    stride = block.conv1.stride[0]
    if stride == 1:
        return (1, 0, 0) if sc is None and planes == c else None
    if stride != 2 or not TRANSITIONS:
        return None
    if sc is None:
        return (2, 0, 0)
    if type(sc) is PadShortcut and sc.stride == 2 and c + sum(sc.pad) == planes:
        return (2, *sc.pad) if not _hooked(sc) else None
    return None


def _weight(conv: nn.Conv2d, *, training: bool = True) -> torch.Tensor | None:
    """conv's weight as the op takes it: bf16, or fp32 under CPU bf16 autocast (cast inside,
    as apply_conv casts it); one that takes a gradient in training; None otherwise."""
    w = conv.weight
    if (training and not w.requires_grad) or w.device.type != "cpu":
        return None
    if w.dtype == torch.bfloat16:
        return w
    if w.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return w if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return None


def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """block(x) as one op where it applies (training a flagged BasicBlock whose shortcut is the
    identity, option A's at stride 2, or absent; conv1 and conv2 taking the AMX kernels (conv1's
    weight gradient alone at stride 2), both norms the fused kernel's, no hooks), else None."""
    if not ENABLED or not conv_wgrad.FORWARD_KERNEL or not block.training:
        return None
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    if not (isinstance(x, torch.Tensor) and torch.is_grad_enabled()):
        return None  # (an fx Proxy, or no_grad: nothing to save for a backward)
    c = x.shape[1] if x.dim() == 4 else 0
    planes = block.conv2.out_channels
    geometry = _shortcut(block, c, planes)
    if geometry is None:
        return None
    stride = geometry[0]
    if not (_plain_conv(block.conv1, c, planes, stride) and _plain_conv(block.conv2, planes)):
        return None
    if any(_hooked(m) for m in (block, block.conv1, block.conv2, block.bn1, block.bn2)):
        return None
    # The fused BN kernel's conditions: the convs keep x's dtype and layout; at stride 2 their
    # outputs have `planes` channels (a multiple of 16, as conv_wgrad.usable checks) and a
    # quarter of x's pixels (two or more: conv_wgrad.usable asks for 16 images and even sides).
    if not (bn_act.usable(block.bn1, x, None) and bn_act.usable(block.bn2, x, None)):
        return None
    w1, w2 = _weight(block.conv1), _weight(block.conv2)
    if w1 is None or w2 is None:
        return None
    # bf16 channels_last, the sizes, the kernels built here: conv1's weight gradient (stride 1:
    # its output and input gradient too) and conv2's (on conv1's output, whose width, halved at
    # stride 2, this checks even)
    if not conv_wgrad.usable(x, planes, stride):
        return None
    bn1, bn2 = block.bn1, block.bn2
    return load_kernel().basic_block_train(
        x, w1, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn1.num_batches_tracked,
        bn1.momentum, bn1.eps, w2, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var,
        bn2.num_batches_tracked, bn2.momentum, bn2.eps, block.residual, *geometry,
    )  # fmt: skip


def infer(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """block(x) for an eval-mode BasicBlock whose BatchNorms are folded into its convolutions
    (reslab.inference.fold_batchnorm, as `reslab eval` and a run's evaluations build the model),
    as two calls of the AMX convolution kernel with bias, shortcut add and ReLU applied as each
    output is written (kernels/block.cpp's basic_block_infer); None wherever it does not apply
    (then the block runs its eager ops): grad mode on, not a plain CPU bf16 channels_last
    tensor, projection shortcuts, hooks, tracing, export or compile, sizes the kernel does not
    take (conv_wgrad.usable: 16 images a thread or more, even output widths).

    Within one bf16 rounding of the eager ops, which round conv1's output, conv2's and their
    sum with the shortcut apart (tests/models/test_block_infer.py)."""
    if not INFER or not conv_wgrad.FORWARD_KERNEL or block.training or torch.is_grad_enabled():
        return None
    if (
        type(x) is not torch.Tensor
        or x.dim() != 4
        or torch.compiler.is_compiling()  # min_images() reads the thread count: a graph break
        or x.shape[0] < conv_wgrad.min_images()
    ):
        # First: the few-image calls of `reslab predict` paid ~25 us of the checks below per
        # block for a None (ResNet-20 at 1 image: 10% of its time).
        return None
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    # a plain tensor (not a Proxy, FakeTensor or other subclass: those are traced, not run)
    if type(x) is not torch.Tensor or x.dtype != torch.bfloat16 or x.dim() != 4:
        return None
    c, planes = x.shape[1], block.conv2.out_channels
    geometry = _shortcut(block, c, planes)
    if geometry is None:
        return None
    stride = geometry[0]
    if stride == 2 and planes > conv_wgrad.STRIDE2_MAX_CHANNELS:
        return None  # oneDNN measured faster there (conv_wgrad.STRIDE2_MAX_CHANNELS)
    conv1, conv2 = block.conv1, block.conv2
    if not (
        _plain_conv(conv1, c, planes, stride, training=False)
        and _plain_conv(conv2, planes, training=False)
    ):
        return None
    if type(block.bn1) is not nn.Identity or type(block.bn2) is not nn.Identity:
        return None
    if any(_hooked(m) for m in (block, conv1, conv2, block.bn1, block.bn2)):
        return None
    w1, w2 = _weight(conv1, training=False), _weight(conv2, training=False)
    if w1 is None or w2 is None or not conv_wgrad.usable(x, planes, stride):
        return None
    return load_kernel().basic_block_infer(
        x, w1, conv1.bias, w2, conv2.bias, block.residual, *geometry
    )


__all__ = ["ENABLED", "INFER", "TRANSITIONS", "forward", "infer"]
