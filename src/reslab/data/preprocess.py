"""How pixels become network inputs; a plain dict of it rides inside checkpoints and exports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Per-channel statistics on the 0-1 pixel scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's and pytorch_resnet_cifar10's
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """Normalisation x -> (x / 255 - mean) / std of a batch [N, 3, H, W].

    mode="per_pixel": `mean` is a [3, H, W] mean image (section 4.2: "per-pixel mean
    subtracted"), std is 1. mode="per_channel": `mean` and `std` are 3 values each.
    """

    kind: str = "cifar"  # "cifar" | "imagenet": which geometric pipeline goes with it
    input_size: int = 32  # side of the network input
    resize: int | None = None  # shorter side before the centre crop at test time (imagenet)
    # AlexNet's geometry: test crops come from the image resized to resize x resize (aspect not
    # kept), as its training crops do, instead of from the image with its shorter side `resize`.
    square: bool = False
    mode: str = "per_channel"  # "per_pixel" | "per_channel"
    mean: torch.Tensor = field(default_factory=lambda: torch.tensor(CIFAR10_MEAN))
    std: torch.Tensor = field(default_factory=lambda: torch.tensor(CIFAR10_STD))

    def __post_init__(self) -> None:
        if not isinstance(self.square, bool):
            raise ValueError(f"square must be true or false, got {self.square!r}")
        if self.mode not in ("per_pixel", "per_channel"):
            raise ValueError(f"mode must be 'per_pixel' or 'per_channel', got {self.mode!r}")
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32)
        self.std = torch.as_tensor(self.std, dtype=torch.float32)
        if self.mean.dim() == 1:
            self.mean = self.mean.view(3, 1, 1)
        if self.std.dim() == 1:
            self.std = self.std.view(3, 1, 1)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._std_cache: dict[torch.device, torch.Tensor] = {}

    def _stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            # Fold the /255 into scale and shift: x * scale - shift, one fused pass per batch.
            scale = (1.0 / (255.0 * self.std)).to(device, dtype)
            shift = (self.mean / self.std).to(device, dtype)
            self._cache[key] = (scale, shift)
        return self._cache[key]

    @property
    def test_resize(self) -> int:
        """The shorter side an image is resized to before the single centre crop at test time:
        `resize` when stored; else the whole image for a CIFAR net (it only ever saw whole
        32x32 images), section 3.4's 256-for-224 ratio for an ImageNet one. predict, eval and
        export all use this one rule."""
        if self.resize:
            return int(self.resize)
        if self.kind == "cifar":
            return self.input_size
        return round(self.input_size * 256 / 224)

    @property
    def test_size(self) -> list[int]:
        """torchvision's resize size for the test crops: [S] (shorter side S, aspect kept) or,
        for `square`, [S, S] with S = test_resize."""
        s = self.test_resize
        return [s, s] if self.square else [s]

    def channel_std(self, device: torch.device) -> torch.Tensor:
        """std as 3 float32 values on `device`, copied there once (PCA lighting divides by it
        every batch; a copy per batch would be a host-to-device transfer per training step)."""
        device = torch.device(device)
        if device not in self._std_cache:
            self._std_cache[device] = self.std.to(device, torch.float32).reshape(3)
        return self._std_cache[device]

    def normalize(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [N, 3, H, W] (0-255) or float (0-1) -> normalised float of `dtype`."""
        if x.dtype == torch.uint8:
            scale, shift = self._stats(x.device, dtype)
            return x.to(dtype) * scale - shift
        mean, std = self.mean.to(x.device, dtype), self.std.to(x.device, dtype)
        return (x.to(dtype) - mean) / std

    def to_dict(self) -> dict[str, Any]:
        per_channel = self.mode == "per_channel"
        d = {
            "kind": self.kind,
            "input_size": self.input_size,
            "resize": self.resize,
            "mode": self.mode,
            "mean": self.mean.flatten().tolist() if per_channel else self.mean.clone(),
            "std": self.std.flatten().tolist(),
        }
        if self.square:  # only then: files without it read as before, by any reslab
            d["square"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            kind=d.get("kind", "cifar"),
            input_size=int(d.get("input_size", 32)),
            resize=d.get("resize"),
            square=d.get("square", False),
            mode=d.get("mode", "per_channel"),
            mean=d["mean"],
            std=d.get("std", (1.0, 1.0, 1.0)),
        )


def named_preprocess(*, name: str, input_size: int) -> dict:
    """The per-channel preprocessing of a data set's statistics ("imagenet" or "cifar10") at a
    model's input size: for weights that carry none (`reslab predict --normalize NAME`)."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet" else (CIFAR10_MEAN, CIFAR10_STD)
    return {"kind": "imagenet" if input_size > 32 else "cifar", "input_size": input_size,
            "resize": 256 if input_size == 224 else None, "mode": "per_channel",
            "mean": list(mean), "std": list(std)}  # fmt: skip
