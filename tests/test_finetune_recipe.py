"""`reslab train --data DIR --weights FILE --out RUN` on a folder of real images just works."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from reslab.cli import main
from reslab.data.preprocess import CIFAR10_MEAN, CIFAR10_STD
from reslab.data.split import stratified_split
from reslab.models import create_model
from reslab.models.weights import CIFAR10_CLASSES, save_safetensors

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def colour_folder(root: Path, per_class: int = 24) -> Path:
    """3 classes separable by colour: noisy 40x36 images, JPEG and PNG mixed."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(rgb, 35, size=(36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    return root


def cifar_weights(path: Path) -> Path:
    """A ResNet-20 written by reslab with CIFAR-10 metadata (32 px, per-channel statistics)."""
    torch.manual_seed(0)
    pre = {"kind": "cifar", "input_size": 32, "resize": None, "mode": "per_channel",
           "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}  # fmt: skip
    return save_safetensors(create_model("resnet20"), path, model_name="resnet20",
                            model_options={}, preprocess=pre, classes=list(CIFAR10_CLASSES))  # fmt: skip


def test_stratified_split_is_seeded_and_per_class() -> None:
    labels = [0] * 20 + [1] * 10 + [2] * 1
    tr, va = stratified_split(labels, fraction=0.2, seed=3)
    assert sorted(tr + va) == list(range(31))
    assert [sum(labels[i] == c for i in va) for c in range(3)] == [4, 2, 0]
    assert stratified_split(labels, fraction=0.2, seed=3) == (tr, va)
    assert stratified_split(labels, fraction=0.2, seed=4)[1] != va


def test_finetune_on_a_plain_folder_reaches_low_validation_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = colour_folder(tmp_path / "my_images")
    weights = cifar_weights(tmp_path / "resnet20.safetensors")
    out = tmp_path / "runs" / "x"
    argv = ["train", "--data", str(data), "--weights", str(weights), "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--epochs", "20"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "recipe finetune" in err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "resnet20"  # named by the weights
    assert cfg["image_size"] == 32 and cfg["resize"] == 37  # from the weights' 32 px
    assert cfg["normalization"] == "per_channel" and cfg["head_lr_mult"] == 10.0
    assert cfg["batch_size"] == 32 <= 72 - 6
    assert cfg["iters"] == round(20 * 66 / 32)  # epochs over the 66 training images
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["preprocess"]["mean"] == pytest.approx(CIFAR10_MEAN)
    assert ckpt["classes"] == ["blue", "green", "red"]
    final = json.loads((out / "final.json").read_text())
    # 6 held-out images (2 per class): a colour-separable task must be learnt, at most 1 wrong.
    assert final["val_error"] <= 100 / 6 + 1e-6, final
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_error" in r for r in rows)


class _PidData(torch.utils.data.Dataset):
    """Labels each sample with the id of the process that loaded it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 4, 4, dtype=torch.uint8), os.getpid()


def test_folder_loader_keeps_its_workers_across_epochs() -> None:
    from reslab.data.loaders import FolderLoader
    from reslab.data.preprocess import Preprocess

    pre = Preprocess(kind="imagenet", input_size=4, mode="per_channel")
    loader = FolderLoader(_PidData(), batch_size=4, preprocess=pre, train=True,
                          device=torch.device("cpu"), workers=1, channels_last=False)  # fmt: skip
    pids = [{int(p) for _, y in loader for p in y} for _ in range(3)]
    assert len(pids[0]) == 1 and pids[0] != {os.getpid()}
    assert pids[0] == pids[1] == pids[2]  # the same worker process served every epoch
