"""Tell which registered ResNet a state_dict (torchvision layout) belongs to, from its keys/shapes.

Weights cannot tell everything: a plain net and an option-A ResNet have the same parameters
(option A adds none), and v1 / v1.5 bottlenecks differ only in where the stride goes. Those are
reported as the ResNet with option A and, for torchvision-shaped bottlenecks, stride_in_3x3=True.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")


def _blocks_per_stage(sd: dict[str, torch.Tensor]) -> list[int]:
    counts: dict[int, int] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            counts[stage] = max(counts.get(stage, 0), block + 1)
    return (
        [counts[s] for s in sorted(counts)]
        if sorted(counts) == list(range(1, len(counts) + 1))
        else []
    )


def infer_architecture(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any], str] | None:
    """-> (registered model name, options, family) or None when the layout is not a known ResNet."""
    from reslab.models.registry import list_models

    conv1, fc = sd.get("conv1.weight"), sd.get("fc.weight")
    blocks = _blocks_per_stage(sd)
    if conv1 is None or fc is None or conv1.dim() != 4 or fc.dim() != 2 or not blocks:
        return None
    opts: dict[str, Any] = {}
    n_down = sum(1 for k in sd if k.endswith(".downsample.0.weight"))
    n_blocks = sum(blocks)
    if n_down == 0:
        opts["shortcut"] = "A"
    elif n_down == n_blocks:
        opts["shortcut"] = "C"
    else:
        opts["shortcut"] = "B"
    if tuple(conv1.shape) == (64, 3, 7, 7) and len(blocks) == 4:
        bottleneck = "layer1.0.conv3.weight" in sd
        table = {
            (2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
            (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152,
        }  # fmt: skip
        depth = table.get((*blocks, bottleneck))
        if depth is None:
            return None
        if bottleneck:
            opts["stride_in_3x3"] = True  # torchvision's v1.5; see the module docstring
        family, default_classes, default_shortcut = "imagenet", 1000, "B"
    elif tuple(conv1.shape[1:]) == (3, 3, 3) and len(blocks) == 3 and len(set(blocks)) == 1:
        if conv1.shape[0] != 16:
            return None
        depth = 6 * blocks[0] + 2
        family, default_classes, default_shortcut = "cifar", 10, "A"
    else:
        return None
    name = f"resnet{depth}"
    if name not in list_models(family):
        return None
    if opts["shortcut"] == default_shortcut:
        del opts["shortcut"]
    if fc.shape[0] != default_classes:
        opts["num_classes"] = int(fc.shape[0])
    return name, opts, family


def describe(sd: dict[str, torch.Tensor]) -> str:
    """A short human description of a state_dict for error messages."""
    arch = infer_architecture(sd)
    if arch is None:
        return f"unrecognised layout, {len(sd)} tensors, first {next(iter(sd), '-')!r}"
    name, opts, _ = arch
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    return f"{name}" + (f" ({extra})" if extra else "")
