"""Named image transforms of the paper (section 3.4) and AlexNet (the source notes' variant).

Per-sample transforms run in DataLoader workers on uint8 tensors [3, H, W] (torchvision
transforms v2, no PIL, no float until the device). Colour work (PCA lighting, mean subtraction)
runs batched on the training device on float [N, 3, H, W] in the 0-1 pixel scale.

| name                        | what                                                          |
|-----------------------------|---------------------------------------------------------------|
| `imagenet_train_transform`  | shorter side random in [256, 480], random 224 crop, flip      |
| `alexnet_train_transform`   | resize to 256x256, random 224 crop, flip                      |
| `center_crop_transform`     | shorter side 256, centre 224 crop (single-view evaluation)    |
| `ten_crop_transform`        | shorter side 256, 4 corners + centre and their flips -> [10,3,224,224] |
| `multiscale_views`          | whole image at shorter sides {224,256,384,480,640} (+ flips)  |
| `PCALighting`               | AlexNet colour augmentation, batched on the device            |
| `prepare_batch`             | uint8 batch -> device, channels-last, normalised (+ lighting) |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from reslab.data.preprocess import Preprocess

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torchvision is imported where a function needs it: its import (which pulls torch._dynamo in
# through torchvision.ops) costs ~0.9 s of every CIFAR command, whose data never meets it.

__all__ = [
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "MULTISCALE_SHORTER_SIDES",
    "PCALighting",
    "RandomShorterSideCrop",
    "TenCrop",
    "alexnet_train_transform",
    "center_crop_transform",
    "imagenet_train_transform",
    "multiscale_transform",
    "multiscale_views",
    "prepare_batch",
    "ten_crop",
    "ten_crop_transform",
    "to_float01",
]

# Published ImageNet PCA of RGB pixel values in the 0-1 scale (PAPER.md). The matrix is written
# row by row as printed there; row r is the R/G/B channel, so the eigenvector p_i is COLUMN i
# (p_1 = (-0.5675, -0.5808, -0.5836), the luminance direction of the largest eigenvalue).
IMAGENET_PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
MULTISCALE_SHORTER_SIDES: tuple[int, ...] = (224, 256, 384, 480, 640)


def to_float01(x: Tensor) -> Tensor:
    """uint8 [.., 3, H, W] in 0-255 -> float32 in 0-1 (floats pass through unchanged)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class RandomShorterSideCrop(nn.Module):
    """Resize the shorter side to a random integer in `shorter_side` (inclusive), then take a
    random `size` x `size` crop - fused: the crop box is mapped back to the source image and only
    that box is resized (`resized_crop`), which is 3-6x less resampling work than resizing the
    whole image first.

    NOTE(paper): the box is rounded to whole source pixels, so the effective scale differs from
    the drawn one by under one source pixel over the box (< 0.6% at 224/480); the distribution of
    scales and positions is otherwise the paper's.
    """

    def __init__(self, *, size: int = 224, shorter_side: tuple[int, int] = (256, 480)) -> None:
        super().__init__()
        lo, hi = shorter_side
        if not size <= lo <= hi:
            raise ValueError(
                f"need size <= shorter_side[0] <= shorter_side[1], got {size}, {shorter_side}"
            )
        self.size, self.lo, self.hi = size, lo, hi

    def sample_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """Draw (top, left, height, width) of the source box for an h x w image."""
        s = int(torch.randint(self.lo, self.hi + 1, ()).item())
        scale = s / min(h, w)
        # Size after the (virtual) resize, as torchvision's resize would compute it.
        rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        top = int(torch.randint(0, rh - self.size + 1, ()).item())
        left = int(torch.randint(0, rw - self.size + 1, ()).item())
        bh, bw = min(h, max(1, round(self.size / scale))), min(w, max(1, round(self.size / scale)))
        return min(round(top / scale), h - bh), min(round(left / scale), w - bw), bh, bw

    def forward(self, img: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        t, c, bh, bw = self.sample_box(*img.shape[-2:])
        return F.resized_crop(img, t, c, bh, bw, [self.size, self.size], antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, shorter_side=({self.lo}, {self.hi})"


def imagenet_train_transform(
    *, crop_size: int = 224, shorter_side: tuple[int, int] = (256, 480)
) -> v2.Compose:
    """Section 3.4: shorter side random in [256, 480], random 224 crop, horizontal flip.

    uint8 [3, H, W] -> uint8 [3, 224, 224]. Per-pixel mean and PCA lighting follow on the device
    (`PCALighting`, `Preprocess.normalize`). Images smaller than the crop are upscaled by the
    resize (any shorter side < 256 is), never padded.
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            RandomShorterSideCrop(size=crop_size, shorter_side=shorter_side),
            v2.RandomHorizontalFlip(),
        ]
    )


def alexnet_train_transform(*, resize: int = 256, crop_size: int = 224) -> v2.Compose:
    """The source notes' (AlexNet) variant: resize to 256x256 (aspect not kept), random 224
    crop, horizontal flip. uint8 [3, H, W] -> uint8 [3, 224, 224]; PCA lighting on the device."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize([resize, resize], antialias=True),
            v2.RandomCrop(crop_size),
            v2.RandomHorizontalFlip(),
        ]
    )


def _test_size(resize: int, square: bool) -> list[int]:
    """torchvision's resize size: [S] (shorter side S) or, for AlexNet's `square`, [S, S]."""
    return [resize, resize] if square else [resize]


def center_crop_transform(
    *, resize: int = 256, crop_size: int = 224, square: bool = False
) -> v2.Compose:
    """Single-view evaluation: shorter side to `resize` (with `square`, the whole image to
    resize x resize, as AlexNet's training crops see it), centre `crop_size` crop."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(_test_size(resize, square), antialias=True),
                       v2.CenterCrop(crop_size)])  # fmt: skip


def _crop_origins(h: int, w: int, size: int) -> list[tuple[int, int]]:
    # Same centre rounding as torchvision's center_crop.
    ct, cl = round((h - size) / 2.0), round((w - size) / 2.0)
    return [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (ct, cl)]


def ten_crop(images: Tensor, *, size: int) -> Tensor:
    """The standard 10 views: [..., 3, H, W] -> [..., 10, 3, size, size], in this order:
    top-left, top-right, bottom-left, bottom-right, centre, then the horizontal flip of each
    of those five in the same order (view 5 + i == flip(view i))."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"ten_crop: image {h}x{w} is smaller than the crop {size}")
    crops = [images[..., t : t + size, c : c + size] for t, c in _crop_origins(h, w, size)]
    five = torch.stack(crops, dim=-4)
    return torch.cat([five, five.flip(-1)], dim=-4)


class TenCrop(nn.Module):
    """Shorter side to `resize` (with `square`: the image to resize x resize), then `ten_crop`
    -> [10, 3, crop, crop] per image."""

    def __init__(self, *, resize: int = 256, crop_size: int = 224, square: bool = False) -> None:
        super().__init__()
        self.resize, self.crop_size, self.square = resize, crop_size, square

    def forward(self, img: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        img = F.resize(img, _test_size(self.resize, self.square), antialias=True)
        return ten_crop(img, size=self.crop_size)


def ten_crop_transform(*, resize: int = 256, crop_size: int = 224, square: bool = False) -> TenCrop:
    """10-crop testing (Table 3 of the paper; AlexNet's test views, from the 256x256 image with
    `square`)."""
    return TenCrop(resize=resize, crop_size=crop_size, square=square)


def multiscale_views(
    image: Tensor,
    *,
    shorter_sides: Sequence[int] = MULTISCALE_SHORTER_SIDES,
    flip: bool = True,
) -> list[Tensor]:
    """Fully-convolutional multi-scale test: the whole image [3, H, W] resized so its shorter
    side is each of `shorter_sides`; one tensor per scale, [2, 3, h, w] (image, flip) or
    [1, 3, h, w]. Average the class scores of all views (a ResNet's global pool accepts any size).

    NOTE(paper): the flips follow the fully-convolutional test of VGG that the paper cites; pass
    flip=False for the scales alone.
    """
    from torchvision.transforms.v2 import functional as F

    views = []
    for s in shorter_sides:
        x = F.resize(image, s, antialias=True)
        views.append(torch.stack([x, x.flip(-1)]) if flip else x.unsqueeze(0))
    return views


class _MultiScale(nn.Module):
    def __init__(self, shorter_sides: Sequence[int], flip: bool) -> None:
        super().__init__()
        self.shorter_sides, self.flip = tuple(shorter_sides), flip

    def forward(self, img: Tensor) -> list[Tensor]:
        return multiscale_views(img, shorter_sides=self.shorter_sides, flip=self.flip)


def multiscale_transform(
    *, shorter_sides: Sequence[int] = MULTISCALE_SHORTER_SIDES, flip: bool = True
) -> nn.Module:
    """`multiscale_views` as a folder transform; use batch_size=1 (the views differ in size)."""
    return _MultiScale(shorter_sides, flip)


class PCALighting(nn.Module):
    """AlexNet's colour augmentation, batched: every pixel of image n gets
    [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T with a_i ~ N(0, alphastd) drawn once per image.

    Input float [N, 3, H, W] in the 0-1 pixel scale (before mean subtraction); eigenvalues `l`
    and eigenvectors (columns p_i of `eigvec`) are of the 3x3 RGB covariance in that scale:
    the published ImageNet ones (`PCALighting.imagenet()`) or `reslab data stats` output.
    """

    eigval: Tensor
    eigvec: Tensor

    def __init__(
        self,
        *,
        eigval: Sequence[float] | Tensor,
        eigvec: Sequence[Sequence[float]] | Tensor,
        alphastd: float = 0.1,
    ) -> None:
        super().__init__()
        val = torch.as_tensor(eigval, dtype=torch.float32).reshape(3)
        vec = torch.as_tensor(eigvec, dtype=torch.float32).reshape(3, 3)
        self.register_buffer("eigval", val, persistent=False)
        self.register_buffer("eigvec", vec, persistent=False)
        self.alphastd = float(alphastd)

    @classmethod
    def imagenet(cls, *, alphastd: float = 0.1) -> PCALighting:
        return cls(eigval=IMAGENET_PCA_EIGVAL, eigvec=IMAGENET_PCA_EIGVEC, alphastd=alphastd)

    def shifts(
        self, n: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """The RGB offsets [n, 3] for n images (p @ (alpha * l))."""
        if self.eigvec.device != torch.device(device):
            # Once: the constants then stay on the device (a copy per batch would be a
            # host-to-device transfer, and a host sync, every training step).
            self.to(device)
        alpha = torch.randn(n, 3, device=device, generator=generator) * self.alphastd
        return (alpha * self.eigval) @ self.eigvec.T

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"PCALighting wants float [N, 3, H, W] in 0-1, got {x.dtype} {tuple(x.shape)}"
            )
        if self.alphastd == 0:
            return x
        rgb = self.shifts(x.shape[0], device=x.device, generator=generator)
        return x + rgb.to(x.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}, eigval={[round(v, 4) for v in self.eigval.tolist()]}"


def prepare_batch(
    x: Tensor,
    *,
    preprocess: Preprocess,
    device: torch.device,
    lighting: PCALighting | None = None,
    generator: torch.Generator | None = None,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
    first: int = 0,
    total: int | None = None,
) -> Tensor:
    """A uint8 batch [N, 3, H, W] from the DataLoader -> network input on `device`: copy
    (non-blocking from pinned memory), channels-last while still uint8 (4x less to move), one
    fused normalisation pass, then PCA lighting as a per-image offset. All batched; no host sync.

    Lighting adds rgb to x/255 before normalisation; (x/255 + rgb - mean)/std equals
    normalize(x) + rgb/std, so it is folded in after the fused pass. `x` may be the slice
    [first, first + N) of a global batch of `total` images (one rank's share): the lighting
    draws are made for all `total` and sliced, so they do not depend on the world size.
    An evaluation batch of views [N, V, 3, H, W] (ten-crop) is normalised as its N*V crops.
    """
    if x.dim() == 5:
        if lighting is not None:
            raise ValueError("PCA lighting is a training augmentation; views are for testing")
        n, v = x.shape[:2]
        flat = prepare_batch(x.flatten(0, 1), preprocess=preprocess, device=device,
                             channels_last=channels_last, dtype=dtype)  # fmt: skip
        return flat.view(n, v, *flat.shape[1:])  # the evaluator flattens it back, a view
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = preprocess.normalize(x, dtype=dtype)
    if lighting is not None:
        n = x.shape[0]
        rgb = lighting.shifts(n if total is None else total, device=y.device,
                              generator=generator)[first : first + n]  # [N, 3]  # fmt: skip
        y = y.add_((rgb / preprocess.channel_std(y.device)).to(dtype)[:, :, None, None])
    return y if channels_last else y.contiguous()
