"""reslab.features: named feature maps equal to the model's own intermediate outputs."""

from __future__ import annotations

import pytest
import torch

import reslab


def test_resnet18_layer3_layer4_shapes_and_values() -> None:
    torch.manual_seed(0)
    model = reslab.create_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    out = reslab.features(model, layers=["layer3", "layer4"])(x)
    assert list(out) == ["layer3", "layer4"]
    assert out["layer3"].shape == (2, 256, 4, 4) and out["layer4"].shape == (2, 512, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(out["layer4"], model.forward_features(x))


def test_cifar_renamed_and_nested_layers() -> None:
    model = reslab.create_model("resnet20").eval()
    feats = reslab.features(model, layers={"layer2.2.bn2": "f_res", "layer3": "top"})
    out = feats(torch.randn(3, 3, 32, 32))
    assert out["f_res"].shape == (3, 32, 16, 16) and out["top"].shape == (3, 64, 8, 8)
    # Shares parameters with the model (no copy): a change to the model shows in the extractor.
    assert feats.state_dict()["conv1.weight"].data_ptr() == model.conv1.weight.data_ptr()


def test_unknown_layer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no layer\(s\) \['layer4'\].*'layer3'"):
        reslab.features(reslab.create_model("resnet20"), layers=["layer4"])
