"""ImageNet ResNets of Table 1 (ResNet-18 ... ResNet-152) and their plain twins.

Parameter names follow torchvision (conv1, bn1, layer1..layer4, downsample.0/.1, fc), so a
torchvision state_dict loads with strict=True when stride_in_3x3=True (its "v1.5").
"""

from __future__ import annotations

import torch
from torch import nn

from reslab.models import fused_eval
from reslab.models.blocks import BasicBlock, Block, Bottleneck
from reslab.models.bn_act import bn_relu
from reslab.models.registry import ModelInfo, register_model


class ResNet(nn.Module):
    classifier_name = "fc"

    def __init__(
        self,
        block: Block,
        layers: list[int],
        *,
        num_classes: int = 1000,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_3x3: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.opts = dict(shortcut=shortcut, residual=residual, stride_in_3x3=stride_in_3x3)
        self.inplanes = 64
        # conv1: 7x7/2, 64 -> [N, 64, 112, 112]; overlapping 3x3/2 max pool -> [N, 64, 56, 56]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)  # conv2_x, 56x56
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)  # conv3_x, 28x28
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)  # conv4_x, 14x14
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)  # conv5_x, 7x7
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_resnet(self, zero_init_residual=zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self.inplanes, planes, stride if i == 0 else 1, **self.opts))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    fused_bn_act = False  # the stem's relu(bn1(conv1)), as in BasicBlock (models/bn_act.py)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # [N, 3, H, W] -> [N, 64, H/2, W/2]: BN folded in eval, one oneDNN op (models/fused_eval.py)
        stem = None if self.training else fused_eval.stem(self.conv1, self.bn1, x)
        if stem is None:
            stem = bn_relu(self.bn1, self.conv1(x), fused=self.fused_bn_act)
        x = self.maxpool(stem)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, 3, H, W] -> [N, C, H/32, W/32] -> global average -> [N, num_classes]. Any H, W
        # works, which the fully-convolutional multi-scale test (section 3.4) relies on.
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def init_resnet(model: nn.Module, *, zero_init_residual: bool = False) -> None:
    """He init for convs (He et al. 2015b, as section 3.4 says), BN to identity.

    NOTE(paper): the fc layer keeps PyTorch's default (uniform, bound 1/sqrt(fan_in)) init, as
    torchvision's ResNets do; He init's fan-out form is used for the convs (He et al. allow
    either fan), so models and weights stay interchangeable with torchvision's.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # NOTE(paper): not in the paper (Goyal et al. 2017); off by default. The last BN of each
        # residual branch starts at zero, so each block starts as the identity.
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


# (depth, block, blocks per stage, Table 1 multiply-adds, Table 3 top-1 10-crop error)
_TABLE1: list[tuple[int, Block, list[int], float, float | None]] = [
    (18, BasicBlock, [2, 2, 2, 2], 1.8e9, 27.88),
    (34, BasicBlock, [3, 4, 6, 3], 3.6e9, 24.52),
    (50, Bottleneck, [3, 4, 6, 3], 3.8e9, 22.85),
    (101, Bottleneck, [3, 4, 23, 3], 7.6e9, 21.75),
    (152, Bottleneck, [3, 8, 36, 3], 11.3e9, 21.43),
]
_PLAIN_ERR = {18: 27.94, 34: 28.54}  # Table 2 / Table 3


def _builder(block: Block, layers: list[int]):
    def build(
        *,
        num_classes: int = 1000,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_3x3: bool = False,
        zero_init_residual: bool = False,
    ) -> ResNet:
        return ResNet(
            block,
            layers,
            num_classes=num_classes,
            shortcut=shortcut,
            residual=residual,
            stride_in_3x3=stride_in_3x3,
            zero_init_residual=zero_init_residual,
        )

    return build


for _depth, _block, _layers, _macs, _err in _TABLE1:
    register_model(
        ModelInfo(
            f"resnet{_depth}", _builder(_block, _layers), "imagenet", _depth, 224,
            paper_macs=_macs, paper_error=_err,
        )
    )  # fmt: skip
for _depth in (18, 34):
    _, _block, _layers, _macs, _ = _TABLE1[[r[0] for r in _TABLE1].index(_depth)]
    register_model(
        ModelInfo(
            f"plain{_depth}", _builder(_block, _layers), "imagenet", _depth, 224,
            defaults={"residual": False}, paper_macs=_macs, paper_error=_PLAIN_ERR[_depth],
        )
    )  # fmt: skip
