"""Parameter and multiply-add counts, as the paper's Table 1 and Table 6 report them."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, *, channels: int = 3) -> int:
    """Multiply-adds of one forward pass on a [1, channels, size, size] input.

    Counts convolutions and fully connected layers, as the paper's FLOP figures do (BN, ReLU,
    pooling and additions are left out).
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, channels, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total
