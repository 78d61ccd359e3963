"""PCA colour augmentation inside the on-device CIFAR loader, and the `pca_lighting` config."""

from __future__ import annotations

from pathlib import Path

import torch

from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import Preprocess
from reslab.data.setup import build_data
from reslab.data.transforms import PCALighting
from reslab.engine.config import TrainConfig
from reslab.runtime.distributed import DistInfo


def _loader(images: torch.Tensor, *, lighting: PCALighting | None, pad: int, train: bool = True):
    pre = Preprocess(mode="per_channel", mean=[0.5, 0.4, 0.3], std=[0.25, 0.5, 0.2])
    labels = torch.arange(len(images)) % 10
    return TensorLoader(images, labels, batch_size=8, preprocess=pre, train=train, seed=3,
                        pad=pad, flip=True, channels_last=True, lighting=lighting)  # fmt: skip


def _images(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def test_lighting_adds_one_colour_per_image_and_keeps_crops_and_flips() -> None:
    imgs = _images()
    light = PCALighting.imagenet(alphastd=0.5)
    plain = [x for x, _ in _loader(imgs, lighting=None, pad=0)]
    lit = [x for x, _ in _loader(imgs, lighting=light, pad=0)]
    std = torch.tensor([0.25, 0.5, 0.2])
    for a, b in zip(plain, lit, strict=True):
        diff = b - a  # [8, 3, 32, 32]: the same crop/flip, plus a constant per image and channel
        per_image = diff[:, :, :1, :1]
        torch.testing.assert_close(diff, per_image.expand_as(diff), atol=1e-5, rtol=0)
        assert diff.abs().amax() > 1e-3
        # In pixel units the offsets lie in the span of the eigenvectors weighted by eigval.
        rgb = per_image.flatten(1) * std  # [8, 3]
        coef = rgb @ light.eigvec  # coordinates along p1, p2, p3 = alpha_i * l_i
        alpha = coef / light.eigval
        assert alpha.abs().amax() < 0.5 * 6  # N(0, 0.5) draws


def test_lighting_leaves_padding_at_the_mean_and_eval_untouched() -> None:
    imgs = _images()
    light = PCALighting.imagenet(alphastd=0.5)
    a = next(iter(_loader(imgs, lighting=None, pad=4)))[0]
    b = next(iter(_loader(imgs, lighting=light, pad=4)))[0]
    diff = b - a  # [8, 3, 32, 32]
    # Padding is 0 (the mean) in both; every other pixel carries its image's colour offset.
    padded = (a == 0).all(1, keepdim=True) & (b == 0).all(1, keepdim=True)  # [8, 1, 32, 32]
    assert padded.any() and not padded.all()
    inside = diff.masked_fill(padded, float("nan"))
    spread = inside.nan_to_num(-1e9).amax((2, 3)) - inside.nan_to_num(1e9).amin((2, 3))
    assert spread.abs().amax() < 1e-5
    assert inside.nan_to_num(0).abs().amax() > 1e-3
    e1 = torch.cat([x for x, _ in _loader(imgs, lighting=None, pad=4, train=False)])
    e2 = torch.cat([x for x, _ in _loader(imgs, lighting=light, pad=4, train=False)])
    assert torch.equal(e1, e2)


def test_lighting_is_a_pure_function_of_seed_epoch_step() -> None:
    imgs = _images()
    light = PCALighting.imagenet()
    first = _loader(imgs, lighting=light, pad=4)
    whole = [x for x, _ in first]
    again = _loader(imgs, lighting=light, pad=4)
    again.load_state_dict({"epoch": 0, "step": 1, "seed": 3})
    assert torch.equal(next(iter(again))[0], whole[1])


def test_config_pca_lighting_builds_it_from_the_training_images(cifar_root: Path) -> None:
    cfg = TrainConfig(data=str(cifar_root), train_subset=512, eval_subset=100, pca_lighting=True,
                      device="cpu", eval_splits=["val", "test"])  # fmt: skip
    data = build_data(cfg, torch.device("cpu"), DistInfo())
    light = data.train.lighting
    assert isinstance(light, PCALighting)
    val = light.eigval.tolist()
    assert val == sorted(val, reverse=True) and val[0] > 0.02  # CIFAR luminance variance
    assert all(len(list(loader)) == 1 for loader in data.evals.values())  # 100 images each
    assert sum(len(y) for _, y in data.evals["test"]) == 100
    off = build_data(TrainConfig(data=str(cifar_root), train_subset=64, device="cpu"),
                     torch.device("cpu"), DistInfo())  # fmt: skip
    assert off.train.lighting is None
