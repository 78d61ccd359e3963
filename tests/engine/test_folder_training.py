"""Training on a user's own image folder: real JPEG/PNG files made with PIL, decoded for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.engine.checkpoint import load_checkpoint
from reslab.engine.config import TrainConfig
from reslab.engine.trainer import train


def make_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(70, 120, size=2)
                base = np.zeros((h, w, 3), np.uint8)
                base[..., c] = 200  # each class has its own dominant colour
                noise = rng.integers(0, 55, size=(h, w, 3), dtype=np.uint8)
                img = Image.fromarray(base + noise)
                if i % 2:
                    img.save(d / f"{i}.jpg", quality=90)
                else:
                    img.convert("L" if i % 3 == 0 else "RGB").save(d / f"{i}.png")
    (root / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


@pytest.mark.parametrize("augment", ["imagenet", "alexnet"])
def test_train_on_image_folder(tmp_path: Path, augment: str) -> None:
    data = make_folder(tmp_path / "imgs")
    cfg = TrainConfig(
        model="resnet18", dataset="folder", data=str(data), out=str(tmp_path / "run"),
        folder_augment=augment, pca_lighting=True, image_size=64, resize=72, batch_size=6,
        iters=4, eval_every=4, save_every=4, log_every=2, workers=0, device="cpu",
        eval_splits=["val"], val_split=False, milestones=[], lr=0.01,
    )  # fmt: skip
    final = train(cfg, progress=False)
    assert "val_error" in final and 0.0 <= final["val_error"] <= 100.0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"]
    assert ckpt["model_options"]["num_classes"] == 3
    assert ckpt["preprocess"]["kind"] == "imagenet" and ckpt["preprocess"]["input_size"] == 64
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["iter"] == 4
