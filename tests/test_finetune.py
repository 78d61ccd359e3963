"""Fine-tune on a folder of real images from a torchvision-format file, then predict with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from reslab.cli import main

tv_models = pytest.importorskip("torchvision.models")


def _folder(root: Path, images: torch.Tensor, labels: list[int]) -> None:
    # Two CIFAR-10 classes (airplane=0, automobile=1) as 64x64 PNGs in class subfolders.
    big = F.interpolate(images.float(), size=64, mode="bilinear").round().clamp(0, 255).byte()
    count = {0: 0, 1: 0}
    for img, y in zip(big, labels, strict=True):
        if y not in count or count[y] >= 6:
            continue
        for split in ("train", "val"):
            d = root / split / ("airplane", "automobile")[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{count[y]}.png")
        count[y] += 1


def test_finetune_folder_from_torchvision_weights_then_predict(
    tmp_path: Path, cifar_test_images, capsys
) -> None:
    images, labels = cifar_test_images
    _folder(tmp_path / "data", images, labels)
    torch.manual_seed(0)
    src = tv_models.resnet18(weights=None)
    weights = tmp_path / "resnet18-tv.pth"
    torch.save(src.state_dict(), weights)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data", str(tmp_path / "data"), "--model",
            "resnet18", "--weights", str(weights), "--iters", "3", "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--set", "image_size=64",
            "--set", "resize=72", "--set", "batch_size=4", "--set", "freeze_backbone=true",
            "--set", "head_lr_mult=10", "--set", "workers=0"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["classes"] == ["airplane", "automobile"]
    # torchvision weights: ImageNet's per-channel statistics, and config.yaml says so.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["normalization"] == "per_channel"
    assert cfg["_run"]["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert ckpt["preprocess"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    sd = ckpt["model"]
    assert sd["fc.weight"].shape == (2, 512)  # a new head for the folder's classes
    # Frozen backbone: the convolutions are exactly the file's.
    torch.testing.assert_close(sd["layer3.1.conv2.weight"], src.layer3[1].conv2.weight)
    # ... and so are its BatchNorm statistics: frozen layers normalise with the file's.
    for name in ("bn1", "layer1.0.bn1", "layer4.1.bn2"):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(sd[f"{name}.{buf}"], src.state_dict()[f"{name}.{buf}"])
    capsys.readouterr()
    val = tmp_path / "data" / "val"
    assert main(["predict", str(val), "--checkpoint", str(out / "last.pt"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == len(list(val.rglob("*.png"))) >= 6
    assert all({t["class"] for t in p["top"]} == {"airplane", "automobile"} for p in preds)
