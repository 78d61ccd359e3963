"""A BasicBlock of stride 1 and equal widths as one autograd op in CPU training (kernels/block.cpp):
relu(bn2(conv2(relu(bn1(conv1(x))))) [+ x]) with the extension's kernels (the AMX convolutions of
models/conv_wgrad.py, the fused BN+ReLU of models/bn_act.py; x's two gradients summed as conv1's
input gradient is written).

The same kernels on the same tensors as the block's per-op path with both CPU training flags
set, so the same bits (outputs, gradients, running statistics; tests/models/test_block_op.py);
what goes is the per-block Python and autograd bookkeeping: five autograd Functions, two weight
casts and their gradients' casts back, a dozen checks. On a 2-core Xeon with AMX that is
0.17-0.33 ms a block's forward + backward whatever the batch (one 16-channel block on 32 images
of 8x8: 0.64 -> 0.47 ms), ResNet-56's training step x1.065-1.093 and ResNet-20's x1.038-1.060
at batch 128 (two runs each; benchmarks/ab_block_op.py, session 30). `forward` returns None
wherever any condition below fails, and the block takes its per-op path.
"""

from __future__ import annotations

import torch
from torch import nn

from reslab.models import bn_act, conv_wgrad
from reslab.models.bn_act import load_kernel
from reslab.models.layers import _hooked

# False: every block takes its per-op path (benchmarks compare the two).
ENABLED = True


def _plain_conv(conv: nn.Module, channels: int) -> bool:
    """A bias-free 3x3, stride-1, padding-1 nn.Conv2d from `channels` to `channels`."""
    return (
        type(conv) is nn.Conv2d
        and conv.training
        and conv.bias is None
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels == channels
        and conv.out_channels == channels
    )


def _weight(conv: nn.Conv2d) -> torch.Tensor | None:
    """conv's weight as the op takes it: bf16, or fp32 under CPU bf16 autocast (cast inside,
    as apply_conv casts it); None otherwise."""
    w = conv.weight
    if not w.requires_grad or w.device.type != "cpu":
        return None
    if w.dtype == torch.bfloat16:
        return w
    if w.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return w if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return None


def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """block(x) as one op where it applies (training a flagged BasicBlock whose shortcut is the
    identity or absent, conv1 and conv2 taking the AMX kernels, both norms the fused kernel's,
    no hooks), else None."""
    if not ENABLED or not conv_wgrad.FORWARD_KERNEL or not block.training:
        return None
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    if not (isinstance(x, torch.Tensor) and torch.is_grad_enabled()):
        return None  # (an fx Proxy, or no_grad: nothing to save for a backward)
    if block.residual and block.downsample is not None:
        return None
    c = x.shape[1] if x.dim() == 4 else 0
    if not (_plain_conv(block.conv1, c) and _plain_conv(block.conv2, c)):
        return None
    if any(_hooked(m) for m in (block, block.conv1, block.conv2, block.bn1, block.bn2)):
        return None
    # the fused BN kernel's conditions (the convs keep x's shape, dtype and layout)
    if not (bn_act.usable(block.bn1, x, None) and bn_act.usable(block.bn2, x, None)):
        return None
    w1, w2 = _weight(block.conv1), _weight(block.conv2)
    if w1 is None or w2 is None:
        return None
    if not conv_wgrad.usable(x, c, 1):  # bf16 channels_last, the sizes, the kernel built here
        return None
    bn1, bn2 = block.bn1, block.bn2
    return load_kernel().basic_block_train(
        x, w1, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn1.num_batches_tracked,
        bn1.momentum, bn1.eps, w2, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var,
        bn2.num_batches_tracked, bn2.momentum, bn2.eps, block.residual,
    )  # fmt: skip


__all__ = ["ENABLED", "forward"]
