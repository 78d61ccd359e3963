"""Training on a user's own image folder: real JPEG/PNG files made with PIL, decoded for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.engine.config import TrainConfig
from reslab.engine.trainer import train
from reslab.runtime.checkpoint import load_checkpoint

COLOURS = ((220, 30, 30), (30, 220, 30), (30, 30, 220))  # one solid colour per class


def make_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """Images of one solid colour per class (plus a little noise): any net that learns at all
    separates them. Some training images are greyscale PNGs (still apart by brightness)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(70, 120, size=2)
                noise = rng.integers(0, 20, size=(h, w, 3), dtype=np.uint8)
                img = Image.fromarray(np.array(COLOURS[c], np.uint8) + noise)
                if i % 2:
                    img.save(d / f"{i}.jpg", quality=90)
                else:
                    grey = i % 3 == 0 and split == "train"
                    img.convert("L" if grey else "RGB").save(d / f"{i}.png")
    (root / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


@pytest.mark.parametrize("augment", ["imagenet", "alexnet"])
def test_train_on_image_folder(tmp_path: Path, augment: str) -> None:
    data = make_folder(tmp_path / "imgs")
    cfg = TrainConfig(
        model="alexnet_cifar", dataset="folder", data=str(data), out=str(tmp_path / "run"),
        folder_augment=augment, pca_lighting=True, image_size=32, resize=36, batch_size=6,
        iters=10, eval_every=10, save_every=10, log_every=2, workers=0, device="cpu",
        eval_splits=["val"], val_split=False, milestones=[], lr=0.01,
    )  # fmt: skip
    final = train(cfg, progress=False)
    assert final["val_error"] == 0.0  # all 6 validation images of the separable classes
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"]
    assert ckpt["model_options"]["num_classes"] == 3
    assert ckpt["preprocess"]["kind"] == "imagenet" and ckpt["preprocess"]["input_size"] == 32
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["iter"] == 10 and row["val_error"] == 0.0


def test_classes_beside_val_the_readme_layout(tmp_path: Path) -> None:
    """DIR/CLASS/* with DIR/val/CLASS/* (no DIR/train): val/ is the validation set, not a class
    whose images would be trained on."""
    data = make_folder(tmp_path / "imgs")
    for d in (data / "train").iterdir():
        d.rename(data / d.name)
    (data / "train").rmdir()
    cfg = TrainConfig(
        model="resnet20", dataset="folder", data=str(data), out=str(tmp_path / "run"),
        image_size=32, resize=36, batch_size=6, iters=2, eval_every=2, save_every=2, log_every=1,
        workers=0, device="cpu", eval_splits=["val"], val_split=False, milestones=[],
    )  # fmt: skip
    train(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"]  # no "val" class
    assert ckpt["model_options"]["num_classes"] == 3


def test_a_run_inside_its_image_folder_is_refused(tmp_path: Path) -> None:
    from reslab.engine.rundir import RunDirError

    data = make_folder(tmp_path / "imgs")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data, data / "train" / "runs"):
        cfg = TrainConfig(model="resnet20", dataset="folder", data=str(data), out=str(out),
                          image_size=32, resize=36, batch_size=6, iters=1, workers=0,
                          device="cpu")  # fmt: skip
        with pytest.raises(RunDirError, match="inside the image folder"):
            train(cfg, progress=False)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
