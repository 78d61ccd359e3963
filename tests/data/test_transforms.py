"""Property tests of the named transforms: shapes, bounds, exact flips and views, PCA lighting."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms.v2 import functional as F

from reslab.data.transforms import (
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    PCALighting,
    RandomShorterSideCrop,
    alexnet_train_transform,
    center_crop_transform,
    imagenet_train_transform,
    multiscale_views,
    ten_crop,
    ten_crop_transform,
)

FAST = settings(max_examples=25, deadline=None)
sides = st.integers(min_value=8, max_value=400)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@FAST
@given(h=sides, w=sides, seed=st.integers(0, 2**16))
def test_train_transforms_shapes_and_dtypes(h: int, w: int, seed: int) -> None:
    torch.manual_seed(seed)
    img = _image(h, w, seed)
    for t in (imagenet_train_transform(), alexnet_train_transform(), center_crop_transform()):
        out = t(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert ten_crop_transform()(img).shape == (10, 3, 224, 224)


@FAST
@given(
    h=sides,
    w=sides,
    lo=st.integers(224, 480),
    extra=st.integers(0, 300),
    seed=st.integers(0, 2**16),
)
def test_shorter_side_crop_box_inside_and_to_scale(
    h: int, w: int, lo: int, extra: int, seed: int
) -> None:
    t = RandomShorterSideCrop(size=224, shorter_side=(lo, lo + extra))
    torch.manual_seed(seed)
    for _ in range(10):
        top, left, bh, bw = t.sample_box(h, w)
        assert top >= 0 and top + bh <= h and left >= 0 and left + bw <= w
        assert bh == bw or min(h, w) == min(bh, bw)  # square unless the image is narrower
        # The box is the crop's footprint at a shorter side s in [lo, lo+extra] (to a pixel).
        s = 224 * min(h, w) / bh
        assert lo * (1 - 1.0 / bh) - 1e-6 <= s or bh == min(h, w)
        assert s <= (lo + extra) * (1 + 1.0 / bh) + 1e-6 or bh == 1


def test_shorter_side_crop_matches_resize_then_crop() -> None:
    """At a fixed scale the fused op equals resize-then-crop up to resampling at the border."""
    img = _image(300, 400).float()
    img = F.gaussian_blur(img, [9, 9], [3.0, 3.0])  # smooth, so resampling differences are tiny
    t = RandomShorterSideCrop(size=224, shorter_side=(300, 300))  # scale 1: an exact crop
    torch.manual_seed(0)
    top, left, bh, bw = t.sample_box(300, 400)
    assert (bh, bw) == (224, 224)
    torch.manual_seed(0)
    out = t(img)
    assert torch.equal(out, img[:, top : top + 224, left : left + 224])


def test_flip_is_exact_and_both_ways() -> None:
    img = _image(224, 224)
    t = imagenet_train_transform(shorter_side=(224, 224))  # no resampling: crop = whole image
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out = t(img)
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))
        seen.add(torch.equal(out, img))
    assert seen == {True, False}


@FAST
@given(h=st.integers(16, 80), w=st.integers(16, 80), size=st.integers(1, 16), n=st.integers(1, 3))
def test_ten_crop_is_exactly_the_ten_views(h: int, w: int, size: int, n: int) -> None:
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8)
    v = ten_crop(x, size=size)
    assert v.shape == (n, 10, 3, size, size)
    ct, cl = round((h - size) / 2), round((w - size) / 2)
    origins = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (ct, cl)]
    for i, (t, c) in enumerate(origins):
        crop = x[:, :, t : t + size, c : c + size]
        assert torch.equal(v[:, i], crop)
        assert torch.equal(v[:, 5 + i], crop.flip(-1))
    tv = F.five_crop(x[0], [size, size])  # torchvision's corners and centre, same order
    assert all(torch.equal(v[0, i], tv[i]) for i in range(5))


def test_ten_crop_refuses_small_images() -> None:
    with pytest.raises(ValueError, match="smaller than the crop"):
        ten_crop(_image(10, 30), size=16)


@FAST
@given(h=st.integers(8, 120), w=st.integers(8, 120))
def test_multiscale_views(h: int, w: int) -> None:
    sides = (24, 40, 64)
    views = multiscale_views(_image(h, w), shorter_sides=sides)
    for s, v in zip(sides, views):
        assert v.shape[0] == 2 and min(v.shape[-2:]) == s and v.dtype == torch.uint8
        assert abs(v.shape[-1] / v.shape[-2] - w / h) < 2 / min(v.shape[-2:]) + 1e-6
        assert torch.equal(v[1], v[0].flip(-1))


def test_multiscale_default_scales_are_the_papers() -> None:
    views = multiscale_views(_image(30, 40))
    assert [min(v.shape[-2:]) for v in views] == [224, 256, 384, 480, 640]
    assert [v.shape[0] for v in multiscale_views(_image(30, 40), flip=False)] == [1] * 5


def test_published_eigenvectors_are_orthonormal_columns() -> None:
    v = torch.tensor(IMAGENET_PCA_EIGVEC)
    torch.testing.assert_close(v.T @ v, torch.eye(3), atol=2e-4, rtol=0)
    assert (v[:, 0] < 0).all()  # p1, the largest eigenvalue's, is the luminance axis


def _random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q.float()


@settings(max_examples=10, deadline=None)
@given(
    eig=st.lists(st.floats(0.001, 0.5), min_size=3, max_size=3),
    alphastd=st.sampled_from([0.05, 0.1, 0.3]),
    seed=st.integers(0, 1000),
)
def test_pca_lighting_moves_colour_along_eigenvectors(
    eig: list[float], alphastd: float, seed: int
) -> None:
    vec = _random_rotation(seed)
    light = PCALighting(eigval=eig, eigvec=vec, alphastd=alphastd)
    n = 8000
    x = torch.full((n, 3, 2, 2), 0.5)
    g = torch.Generator().manual_seed(seed)
    shift = light(x, generator=g) - x  # [n, 3, 2, 2]
    assert torch.equal(shift, shift[:, :, :1, :1].expand_as(shift))  # one shift per image
    coords = shift[:, :, 0, 0].double() @ vec.double()  # components along p1, p2, p3
    expected = torch.tensor(eig, dtype=torch.float64) * alphastd  # a_i l_i, a_i ~ N(0, alphastd)
    tol = 4 * math.sqrt(1 / (2 * n))  # 4 standard errors of a sample std
    assert ((coords.std(0) / expected - 1).abs() < tol).all()
    corr = torch.corrcoef(coords.T)
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() < 4 / math.sqrt(n)
    assert (coords.mean(0).abs() < 4 * expected / math.sqrt(n)).all()


def test_pca_lighting_imagenet_scale_and_errors() -> None:
    light = PCALighting.imagenet()
    s = light.shifts(20000, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    p1 = torch.tensor(IMAGENET_PCA_EIGVEC)[:, 0]
    along = s @ p1
    assert abs(along.std().item() / (0.1 * IMAGENET_PCA_EIGVAL[0]) - 1) < 0.03
    with pytest.raises(ValueError, match=r"float \[N, 3, H, W\]"):
        light(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(PCALighting.imagenet(alphastd=0.0)(x), x)


def test_prepare_batch_is_lighting_then_normalize() -> None:
    from reslab.data.preprocess import Preprocess
    from reslab.data.transforms import multiscale_transform, prepare_batch

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    light = PCALighting.imagenet()
    cpu = torch.device("cpu")
    for pre in (
        Preprocess(
            kind="imagenet", input_size=8, mode="per_pixel", mean=torch.rand(3, 8, 8), std=[1.0] * 3
        ),
        Preprocess(
            kind="imagenet",
            input_size=8,
            mode="per_channel",
            mean=[0.4, 0.5, 0.6],
            std=[0.2, 0.3, 0.25],
        ),
    ):
        out = prepare_batch(
            x,
            preprocess=pre,
            device=cpu,
            lighting=light,
            generator=torch.Generator().manual_seed(3),
        )
        shift = light.shifts(4, device=cpu, generator=torch.Generator().manual_seed(3))
        ref = (x.float() / 255 + shift[:, :, None, None] - pre.mean) / pre.std
        torch.testing.assert_close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last)
    views = multiscale_transform(shorter_sides=(16, 24))(x[0])
    assert [tuple(v.shape) for v in views] == [(2, 3, 16, 16), (2, 3, 24, 24)]


def test_published_imagenet_pca_values_and_the_default_alpha_std() -> None:
    """PAPER.md's commonly used ImageNet PCA (0-1 pixel scale), as printed, and a_i ~ N(0, 0.1)."""
    assert IMAGENET_PCA_EIGVAL == (0.2175, 0.0188, 0.0045)
    assert IMAGENET_PCA_EIGVEC == ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140),
                                   (-0.5836, -0.6948, 0.4203))  # fmt: skip
    assert PCALighting.imagenet().alphastd == 0.1
