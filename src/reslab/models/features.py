"""Named intermediate feature maps of a model, for users who build on the backbone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn


def features(
    model: nn.Module, *, layers: Sequence[str] | Mapping[str, str] = ("layer3", "layer4")
) -> nn.Module:
    """A module whose forward returns {name: feature map} for the requested layers.

    `layers` are module names (``"layer3"``, ``"layer2.1.bn2"``...) or a {module name: output
    name} mapping. The model is traced with torch.fx, so the returned module stops computing after
    the last requested layer (no classifier). It shares the model's parameters.

    >>> feats = features(create_model("resnet50"), layers=["layer3", "layer4"])  # doctest: +SKIP
    >>> feats(torch.randn(1, 3, 224, 224))["layer4"].shape  # [1, 2048, 7, 7]  # doctest: +SKIP
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    names = dict(layers) if isinstance(layers, Mapping) else {n: n for n in layers}
    if isinstance(layers, str) or not names:
        raise ValueError("layers must be a non-empty list of module names, e.g. ['layer3']")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"{type(model).__name__} has no layer(s) {unknown}; its top-level layers are {top} "
            "(deeper ones as 'layer2.1.conv1')"
        )
    return create_feature_extractor(model, return_nodes=names)
