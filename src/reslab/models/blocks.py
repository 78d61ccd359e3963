"""Residual blocks (section 3): out = relu(F(x) + shortcut(x)); plain twins drop the addition."""

from __future__ import annotations

import torch
from torch import nn

from reslab.models import block_op, fused_eval
from reslab.models.bn_act import bn_relu, fork_for_shortcut
from reslab.models.layers import PadShortcut, _hooked, conv1x1, conv3x3, make_shortcut
from reslab.models.tiled_wgrad import apply_conv, wgrad_path


def _conv_and_shortcut(
    block: nn.Module, conv: nn.Conv2d, x: torch.Tensor, *, tiled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(conv(x), the block's shortcut of x, or None for a plain block). An option-A shortcut is
    computed with the conv as one op in eager training (PadShortcut.with_conv: the same values,
    a cheaper input gradient); with the fused kernel, an identity shortcut's input gradient is
    summed by the kernel too (bn_act.fork_for_shortcut)."""
    sc = block.downsample if block.residual else None
    path = wgrad_path(conv, x) if tiled and isinstance(sc, PadShortcut) else ""
    if isinstance(sc, PadShortcut) and path != "tiled":
        # the AMX kernel's weight gradient works inside the combined op; tiling does not
        pair = sc.with_conv(conv, x, wgrad_kernel=path == "kernel")
        if pair is not None:
            return pair
    # Training only (the kernel's BN runs in training mode alone: in eval the fork would only
    # stand in the way of torch.func, forward-mode AD and fx), and not where a hook could modify
    # conv1's input in place (a custom Function's views refuse that) or use x a third time.
    fork = block.residual and sc is None and block.fused_bn_act and block.training
    if fork and not (_hooked(conv) or _hooked(block)):
        x_conv, x_short = fork_for_shortcut(x)
        return apply_conv(conv, x_conv, tiled=tiled), x_short
    out = apply_conv(conv, x, tiled=tiled)
    if not block.residual:
        return out, None
    return out, (x if sc is None else sc(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs (Table 1, ResNet-18/34; section 4.2, CIFAR nets)."""

    expansion = 1
    # How relu(bn(x) [+ shortcut]) is computed in training: one fused CPU kernel when True
    # (models/bn_act.py; set by use_fused_bn_act), else eager ops. Same math, same weights.
    fused_bn_act = False
    # How a training step sums the 3x3 convs' weight gradients on small maps: over tiled images
    # when True (models/tiled_wgrad.py; set by use_tiled_wgrad), else directly. Same gradient.
    tiled_wgrad = False

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_3x3: bool = False,
    ) -> None:
        super().__init__()
        del stride_in_3x3  # only bottlenecks have a choice of where the stride goes
        self.residual = residual
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(
            inplanes, planes, stride, option=shortcut, residual=residual
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, tiled = self.fused_bn_act, self.tiled_wgrad
        # The whole block as one op where it applies (models/block_op.py): training with both
        # CPU paths on. Eval with its BatchNorms folded (as `reslab eval` runs it): on AMX in
        # bf16, two calls of reslab's kernel; elsewhere two oneDNN convolutions with the bias,
        # add and ReLUs fused in (models/fused_eval.py).
        if self.training:
            out = block_op.forward(self, x) if fused and tiled else None
        else:
            out = block_op.infer(self, x)
            out = fused_eval.block(self, x) if out is None else out
        if out is not None:
            return out
        out, short = _conv_and_shortcut(self, self.conv1, x, tiled=tiled)
        out = bn_relu(self.bn1, out, fused=fused)
        # [N, planes, H/s, W/s]; bn2(out) is F(x), added before the ReLU
        out = apply_conv(self.conv2, out, tiled=tiled)
        return bn_relu(self.bn2, out, short, fused=fused)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) — Table 1, ResNet-50/101/152, Fig. 5 right.

    stride_in_3x3=False is the paper's v1 (stride on the first 1x1); True is torchvision's v1.5.
    """

    expansion = 4
    fused_bn_act = False  # as in BasicBlock
    tiled_wgrad = False  # as in BasicBlock

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_3x3: bool = False,
    ) -> None:
        super().__init__()
        self.residual = residual
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        width = planes
        self.conv1 = conv1x1(inplanes, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(
            inplanes, planes * self.expansion, stride, option=shortcut, residual=residual
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, tiled = self.fused_bn_act, self.tiled_wgrad
        out = None if self.training else fused_eval.block(self, x)  # BN folded: 3 fused convs
        if out is not None:
            return out
        out, short = _conv_and_shortcut(self, self.conv1, x, tiled=False)  # 1x1: never tiled
        out = bn_relu(self.bn1, out, fused=fused)
        out = bn_relu(self.bn2, apply_conv(self.conv2, out, tiled=tiled), fused=fused)
        out = self.conv3(out)
        return bn_relu(self.bn3, out, short, fused=fused)


Block = type[BasicBlock] | type[Bottleneck]
