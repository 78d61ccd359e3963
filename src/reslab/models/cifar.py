"""CIFAR-10 ResNets and plain nets of section 4.2: 6n+2 weighted layers on 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from reslab.models import fused_eval
from reslab.models.blocks import BasicBlock
from reslab.models.bn_act import bn_relu
from reslab.models.registry import ModelInfo, register_model
from reslab.models.resnet import init_resnet


class CifarResNet(nn.Module):
    """conv 3x3/16, then 3 stages of n basic blocks on 32/16/8 maps with 16/32/64 filters,
    global average pool, FC: 1 + 6n + 1 = 6n+2 weighted layers (section 4.2)."""

    classifier_name = "fc"

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        shortcut: str = "A",
        residual: bool = True,
        zero_init_residual: bool = False,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        opts = dict(shortcut=shortcut, residual=residual)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)  # [N, 16, 32, 32]
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = [
                BasicBlock(inplanes if j == 0 else planes, planes, 2 if i and not j else 1, **opts)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages  # 32x32, 16x16, 8x8
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_resnet(self, zero_init_residual=zero_init_residual)

    fused_bn_act = False  # the stem's relu(bn1(conv1)), as in BasicBlock

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # [N, 16, 32, 32]; BN folded in eval: one oneDNN op (models/fused_eval.py)
        stem = None if self.training else fused_eval.stem(self.conv1, self.bn1, x)
        x = bn_relu(self.bn1, self.conv1(x), fused=self.fused_bn_act) if stem is None else stem
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def cifar_resnet(
    *,
    depth: int,
    num_classes: int = 10,
    shortcut: str = "A",
    residual: bool = True,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """Any depth 6n+2, e.g. cifar_resnet(depth=74)."""
    return CifarResNet(
        depth,
        num_classes=num_classes,
        shortcut=shortcut,
        residual=residual,
        zero_init_residual=zero_init_residual,
    )


# Table 6: depth -> (parameters as the paper rounds them, test error %)
TABLE6: dict[int, tuple[float, float]] = {
    20: (0.27e6, 8.75),
    32: (0.46e6, 7.51),
    44: (0.66e6, 7.17),
    56: (0.85e6, 6.97),
    110: (1.7e6, 6.43),
    1202: (19.4e6, 7.93),
}

for _depth, (_params, _err) in TABLE6.items():
    register_model(
        ModelInfo(
            f"resnet{_depth}", cifar_resnet, "cifar", _depth, 32,
            defaults={"depth": _depth}, paper_params=_params, paper_error=_err,
        )
    )  # fmt: skip
for _depth in (20, 32, 44, 56, 110):
    register_model(
        ModelInfo(
            f"plain{_depth}", cifar_resnet, "cifar", _depth, 32,
            defaults={"depth": _depth, "residual": False},
        )
    )  # fmt: skip
