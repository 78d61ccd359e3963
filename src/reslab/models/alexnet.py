"""AlexNet (Krizhevsky et al. 2012), kept as the source notes' baseline, and its small CIFAR CNN.

The two-GPU layout is modelled as `towers`: each tower holds half of every layer's kernels.
conv2, conv4 and conv5 see only their own tower's channels; conv1, conv3 and the FC layers see
both towers' outputs (the paper's cross-GPU connections). On one device this is the same function
as grouped convolutions; `place_towers(model, [dev0, dev1])` puts each tower on its own device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reslab.models.layers import LocalResponseNorm, make_activation
from reslab.models.registry import ModelInfo, register_model

Towers = list[torch.Tensor]


class TowerLayer(nn.Module):
    """One layer split over towers. cross=True: every tower reads all towers' channels."""

    def __init__(self, make: Callable[[], nn.Module], towers: int, *, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        self.towers = nn.ModuleList(make() for _ in range(towers))

    def forward(self, xs: Towers) -> Towers:
        if not self.cross:
            return [layer(x) for layer, x in zip(self.towers, xs, strict=True)]
        outs = []
        for layer in self.towers:
            dev = next(layer.parameters()).device
            outs.append(layer(torch.cat([x.to(dev) for x in xs], dim=1)))
        return outs


def _each(fn: nn.Module, xs: Towers) -> Towers:
    return [fn(x) for x in xs]


def _pool(overlap: bool) -> nn.MaxPool2d:
    # Overlapping pooling (AlexNet section 3.4): 3x3 windows, stride 2; else 2x2 stride 2.
    return nn.MaxPool2d(3, 2) if overlap else nn.MaxPool2d(2, 2)


class AlexNet(nn.Module):
    """224x224 input: conv1 96@11x11/4 -> 55x55 ... conv5 256@3x3 -> pool -> [N, 256, 6, 6] ->
    fc6 4096 -> fc7 4096 -> fc8 classes. Channel counts are totals over the towers."""

    classifier_name = "fc8"

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        activation: str = "relu",
        lrn: bool = True,
        overlap_pool: bool = True,
        dropout: float = 0.5,
        towers: int = 2,
    ) -> None:
        super().__init__()
        if towers not in (1, 2):
            raise ValueError(f"towers must be 1 or 2, got {towers}")
        t = towers
        # NOTE(paper): padding 2 on conv1 maps a 224 input to 55x55 as the paper's figure shows
        # (the paper's stated 224 with 11x11/4 and no padding does not give 55).
        self.conv1 = TowerLayer(lambda: nn.Conv2d(3, 96 // t, 11, 4, 2), t, cross=True)
        self.conv2 = TowerLayer(lambda: nn.Conv2d(96 // t, 256 // t, 5, padding=2), t, cross=False)
        self.conv3 = TowerLayer(lambda: nn.Conv2d(256, 384 // t, 3, padding=1), t, cross=True)
        self.conv4 = TowerLayer(lambda: nn.Conv2d(384 // t, 384 // t, 3, padding=1), t, cross=False)
        self.conv5 = TowerLayer(lambda: nn.Conv2d(384 // t, 256 // t, 3, padding=1), t, cross=False)
        self.fc6 = TowerLayer(lambda: nn.Linear(256 * 6 * 6, 4096 // t), t, cross=True)
        self.fc7 = TowerLayer(lambda: nn.Linear(4096, 4096 // t), t, cross=True)
        self.fc8 = nn.Linear(4096, num_classes)
        self.act = make_activation(activation)
        self.lrn = LocalResponseNorm() if lrn else nn.Identity()
        self.pool = _pool(overlap_pool)
        # Dropout on the outputs of the first two FC layers (AlexNet section 4.2).
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _init_alexnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, lrn, pool, drop = self.act, self.lrn, self.pool, self.drop
        xs = [x]
        xs = _each(pool, _each(lrn, _each(a, self.conv1(xs))))  # response-normalised, pooled
        xs = _each(pool, _each(lrn, _each(a, self.conv2(xs))))
        xs = _each(a, self.conv3(xs))
        xs = _each(a, self.conv4(xs))
        xs = _each(pool, _each(a, self.conv5(xs)))  # [N, 256/t, 6, 6] per tower
        xs = [torch.flatten(x, 1) for x in xs]
        xs = _each(drop, _each(a, self.fc6(xs)))
        xs = _each(drop, _each(a, self.fc7(xs)))
        dev = self.fc8.weight.device
        return self.fc8(torch.cat([x.to(dev) for x in xs], dim=1))


def _init_alexnet(model: nn.Module) -> None:
    # AlexNet section 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC
    # layers (to give ReLUs positive inputs early), 0 elsewhere.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            one = name.split(".")[0] in ("conv2", "conv4", "conv5", "fc6", "fc7")
            nn.init.constant_(m.bias, 1.0 if one else 0.0)


def place_towers(model: AlexNet, devices: Sequence[torch.device | str]) -> AlexNet:
    """Put tower i of every layer on devices[i] (AlexNet's two-GPU split); fc8 on devices[0]."""
    if len(devices) != len(model.conv1.towers):
        raise ValueError(f"{len(model.conv1.towers)} towers need as many devices, got {devices}")
    for layer in (model.conv1, model.conv2, model.conv3, model.conv4, model.conv5):
        for tower, dev in zip(layer.towers, devices, strict=True):
            tower.to(dev)
    for layer in (model.fc6, model.fc7):
        for tower, dev in zip(layer.towers, devices, strict=True):
            tower.to(dev)
    model.fc8.to(devices[0])
    return model


class AlexNetCifar(nn.Module):
    """The 4-layer CNN of AlexNet's ReLU-versus-tanh experiment (Figure 1) on 32x32 CIFAR-10.

    NOTE(paper): the paper does not give this net's layers; this is conv 5x5/64, pool, LRN,
    conv 5x5/64, LRN, pool, FC 384, FC 10, in the style of cuda-convnet's CIFAR nets, with the
    same options as `alexnet` so the ablations of the source notes can run on CIFAR-10.
    """

    classifier_name = "fc4"

    def __init__(
        self,
        *,
        num_classes: int = 10,
        activation: str = "relu",
        lrn: bool = True,
        overlap_pool: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)  # [N, 64, 32, 32]
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)  # [N, 64, 16, 16]
        self.fc3 = nn.Linear(64 * 8 * 8, 384)
        self.fc4 = nn.Linear(384, num_classes)
        self.act = make_activation(activation)
        self.lrn = LocalResponseNorm() if lrn else nn.Identity()
        # Both pools map 32 -> 16 -> 8: 3x3/2 with padding 1, or 2x2/2.
        self.pool = nn.MaxPool2d(3, 2, padding=1) if overlap_pool else nn.MaxPool2d(2, 2)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrn(self.pool(self.act(self.conv1(x))))
        x = self.pool(self.lrn(self.act(self.conv2(x))))
        x = self.drop(self.act(self.fc3(torch.flatten(x, 1))))
        return self.fc4(x)


def alexnet(
    *,
    num_classes: int = 1000,
    activation: str = "relu",
    lrn: bool = True,
    overlap_pool: bool = True,
    dropout: float = 0.5,
    towers: int = 2,
) -> AlexNet:
    return AlexNet(
        num_classes=num_classes, activation=activation, lrn=lrn,
        overlap_pool=overlap_pool, dropout=dropout, towers=towers,
    )  # fmt: skip


def alexnet_cifar(
    *,
    num_classes: int = 10,
    activation: str = "relu",
    lrn: bool = True,
    overlap_pool: bool = True,
    dropout: float = 0.0,
) -> AlexNetCifar:
    return AlexNetCifar(
        num_classes=num_classes, activation=activation, lrn=lrn,
        overlap_pool=overlap_pool, dropout=dropout,
    )  # fmt: skip


register_model(ModelInfo("alexnet", alexnet, "alexnet", 8, 224, paper_params=60e6))  # "60 million"
register_model(ModelInfo("alexnet_cifar", alexnet_cifar, "alexnet", 4, 32))
