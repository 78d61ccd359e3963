"""Figure 7: the standard deviation of every 3x3 layer's response (after BN, before the ReLU or
the addition), per layer, for a trained model in eval mode on test images."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from reslab.analysis.plots import save_figure


def response_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm2d layers that directly follow a 3x3 conv, in module order.

    The pairing is by name, as every reslab model spells it: `prefix.bnK` follows
    `prefix.convK` (stem conv1/bn1, blocks' conv1/bn1, conv2/bn2, ...). In a CIFAR ResNet-20 that
    is the stem's bn1 and both BNs of each of the 9 basic blocks: 19 layers.
    """
    modules = dict(model.named_modules())
    names = []
    for name, mod in modules.items():
        if not isinstance(mod, nn.BatchNorm2d):
            continue
        prefix, _, leaf = name.rpartition(".")
        if not leaf.startswith("bn"):
            continue
        conv = modules.get(f"{prefix}.conv{leaf[2:]}" if prefix else f"conv{leaf[2:]}")
        if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (3, 3):
            names.append(name)
    return names


@dataclass
class _Moments:
    n: int = 0
    s: torch.Tensor | None = None  # running sum, float64 scalar on the device
    ss: torch.Tensor | None = None  # running sum of squares

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().to(torch.float64)
        s, ss = t.sum(), t.square().sum()
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += t.numel()

    def std(self) -> float:
        if not self.n or self.s is None or self.ss is None:
            raise ValueError("a response layer never ran; the batches did not reach it")
        mean = self.s / self.n
        return float((self.ss / self.n - mean * mean).clamp_min(0).sqrt())


@torch.no_grad()
def layer_response_std(
    model: nn.Module,
    batches: torch.Tensor | Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str,
    layers: Sequence[str] | None = None,
) -> dict[str, float]:
    """{layer name: std of its response} in the order the layers run (the paper's "original"
    layer index), measured with forward hooks with the model in eval mode.

    batches: one normalised input tensor [N, 3, H, W], or an iterable of them (or of (x, y)
    pairs, as loaders yield). NOTE(paper): the paper does not say how the std is pooled; here it
    is the std of all N*C*H*W response values of the layer (population std), accumulated in
    float64 over all batches.
    """
    names = list(layers) if layers is not None else response_layers(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer after a 3x3 conv")
    modules = dict(model.named_modules())
    moments = {n: _Moments() for n in names}
    order: list[str] = []

    def hook_for(name: str):
        def hook(_mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            # Runs as BN returns, before the in-place ReLU or the addition touches `out`.
            if name not in order:
                order.append(name)
            moments[name].add(out)

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for b in [batches] if isinstance(batches, torch.Tensor) else batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            if not x.is_floating_point():  # torch's "expected scalar type Byte" named nothing
                raise TypeError(f"layer_response_std takes normalised float images, got "
                                f"{x.dtype}; normalise them first (Preprocess.normalize)")  # fmt: skip
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: moments[n].std() for n in order + [n for n in names if n not in order]}


def plot_responses(
    stds: Mapping[str, Sequence[float]], *, out: str | Path, title: str | None = None
) -> Path:
    """Figure 7 layout: top, std by original layer index; bottom, each model's stds sorted in
    descending order. `stds` maps a model label (e.g. "plain-20", "ResNet-56") to its values."""
    if not stds:
        raise ValueError("no models to plot")
    fig = Figure(figsize=(7, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    for i, (label, values) in enumerate(stds.items()):
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError(f"{label!r} has no layer responses")
        idx = range(1, len(vals) + 1)
        style = dict(color=f"C{i % 10}", linewidth=1.2, marker=".", markersize=4, label=label)
        top.plot(idx, vals, **style)
        bottom.plot(idx, sorted(vals, reverse=True), **style)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=8, frameon=False, loc="best")  # where it covers the fewest points
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)
