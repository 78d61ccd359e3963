"""The ImageNet and AlexNet recipes build the augmentation their descriptions and the paper name,
and a training run's ten-crop validation on an image folder is section 3.4's 10-crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from reslab.data import transforms as T
from reslab.data.setup import build_data
from reslab.engine.config import load_recipe
from reslab.runtime.distributed import DistInfo


def _folder(root: Path, *, size: tuple[int, int] = (300, 260)) -> Path:
    """root/{train,val}/{a,b}/*.png: 3 real decoded PNGs per class and split, 300x260."""
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                px = g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


def _data(recipe: str, root: Path, *sets: str):
    cfg = load_recipe(recipe).override(
        [f"data={root}", "batch_size=2", "workers=0", "device=cpu", *sets]
    )
    return cfg, build_data(cfg, torch.device("cpu"), DistInfo())


def _train_transform(data) -> v2.Compose:
    return data.train.dataset.transform


@pytest.mark.parametrize(
    ("recipe", "first"), [("imagenet-paper", T.RandomShorterSideCrop), ("alexnet", v2.Resize)]
)
def test_paper_recipes_train_with_their_augmentation_and_pca_colour(
    tmp_path: Path, recipe: str, first: type
) -> None:
    cfg, data = _data(recipe, _folder(tmp_path))
    assert cfg.pca_lighting and isinstance(data.train.lighting, T.PCALighting)
    assert data.train.lighting.alphastd == 0.1  # a_i ~ N(0, 0.1), PAPER.md
    steps = _train_transform(data).transforms
    assert isinstance(steps[0], first) and isinstance(steps[-1], v2.RandomHorizontalFlip)
    if recipe == "imagenet-paper":  # section 3.4: shorter side uniform in [256, 480]
        assert (steps[0].lo, steps[0].hi, steps[0].size) == (256, 480, 224)
        assert (cfg.momentum, cfg.weight_decay, cfg.milestones) == (0.9, 1e-4, [150000, 300000])
    else:  # the notes: 256x256, aspect not kept, then random 224 crops
        assert list(steps[0].size) == [256, 256] and isinstance(steps[1], v2.RandomCrop)
        assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (0.01, 5e-4, 2)
        assert cfg.milestones == [300000, 600000, 800000] and cfg.iters == 900000
    x, _ = next(iter(data.train))
    assert x.shape == (2, 3, 224, 224) and torch.isfinite(x).all()


def test_ten_crop_validation_of_a_folder_is_the_papers_10_crop(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    _, data = _data("imagenet-paper", root, "eval_views=ten-crop")
    x, y = next(iter(data.evals["val"]))
    assert x.shape == (1, 10, 3, 224, 224) and y.tolist() == [0]  # batch_size // 10, at least 1
    # The same views `reslab eval --views ten-crop` makes: the image's shorter side to 256,
    # 4 corners + centre and their mirrors, each normalised like a training crop.
    from torchvision.io import decode_image

    img = decode_image(str(root / "val" / "a" / "0.png"))
    views = T.ten_crop_transform(resize=256, crop_size=224)(img)  # [10, 3, 224, 224] uint8
    want = data.preprocess.normalize(views.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(x[0], want)
    # The evaluator turns them into one prediction per image, as for CIFAR's device views.
    from reslab.engine.evaluator import evaluate
    from reslab.models import create_model

    model = create_model("resnet18", num_classes=2).eval()
    r = evaluate(model, data.evals["val"], device=torch.device("cpu"), precision="fp32",
                 num_classes=2, views="ten-crop")  # fmt: skip
    assert r.num_samples == 6


@pytest.mark.parametrize("views", ["center", "ten-crop"])
def test_alexnet_tests_on_crops_of_the_256x256_image_as_it_trains(tmp_path: Path, views) -> None:
    """PAPER.md's AlexNet resizes images to 256x256 (aspect not kept) and takes its 224 crops from
    that, in training and at test: the run's validation views, `reslab eval` and `predict` come
    from the squashed 300x260 image, where the ImageNet recipe keeps the aspect ratio."""
    from torchvision.io import decode_image

    from reslab.data.preprocess import Preprocess
    from reslab.predict import fit_to_input

    root = _folder(tmp_path)
    _, data = _data("alexnet", root, f"eval_views={views}")
    assert data.preprocess.square and data.preprocess.to_dict()["square"] is True
    img = decode_image(str(root / "val" / "a" / "0.png"))  # [3, 260, 300]
    squashed = v2.functional.resize(img, [256, 256], antialias=True)
    if views == "ten-crop":
        want = T.ten_crop(squashed, size=224)
    else:
        want = v2.functional.center_crop(squashed, [224, 224])
    x, _ = next(iter(data.evals["val"]))
    batch = want if views == "ten-crop" else want[None]  # uint8 [V, 3, 224, 224]
    expect = data.preprocess.normalize(batch)
    torch.testing.assert_close(x[0], expect if views == "ten-crop" else expect[0])
    # `reslab eval` (eval_run's transforms) and `reslab predict` read the flag from the weights.
    pre = Preprocess.from_dict(data.preprocess.to_dict())
    assert pre.square and torch.equal(fit_to_input(img, pre), v2.functional.center_crop(
        squashed, [224, 224]))  # fmt: skip
    tf = T.center_crop_transform(resize=256, crop_size=224, square=pre.square)
    assert torch.equal(tf(img), v2.functional.center_crop(squashed, [224, 224]))
    # The ImageNet recipe's test crops keep the aspect ratio (shorter side 256), as before.
    _, inet = _data("imagenet-paper", root)
    assert not inet.preprocess.square and "square" not in inet.preprocess.to_dict()
    assert fit_to_input(img, inet.preprocess).shape == (3, 224, 224)
    assert not torch.equal(fit_to_input(img, inet.preprocess), fit_to_input(img, pre))


def test_imagenet_recipe_says_when_it_cannot_subtract_the_per_pixel_mean(tmp_path: Path) -> None:
    """imagenet-paper asks for section 3.4's per-pixel mean; without a `reslab data stats` file
    a folder run normalises with ImageNet's per-channel mean/std and PCA (setup.folder_preprocess,
    NOTE(paper)). The run's banner says so, instead of recording per_channel without a word."""
    from reslab.data.stats import compute_stats, save_stats

    root = _folder(tmp_path / "d")
    cfg, data = _data("imagenet-paper", root)
    assert data.preprocess.mode == cfg.normalization == "per_channel"
    said = [n for n in data.notes if "per-pixel mean" in n]
    assert len(said) == 1 and "stats" in said[0] and "ImageNet" in said[0]
    x = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    save_stats(compute_stats([x]), tmp_path / "stats.pt")
    cfg, data = _data("imagenet-paper", root, f"stats={tmp_path / 'stats.pt'}")
    assert data.preprocess.mode == cfg.normalization == "per_pixel"
    assert not [n for n in data.notes if "per-pixel mean" in n]
