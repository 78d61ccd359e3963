"""Choices a fine-tuning run on an image folder makes for the user: input geometry and
normalisation from the weights' metadata, a batch that fits the data, the number of workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: data/ never imports engine/
    from reslab.engine.config import TrainConfig


def weights_preprocess(path: str | None) -> dict[str, Any] | None:
    """The preprocessing a weights file says its network was trained with (None if unknown)."""
    if not path:
        return None
    from reslab.models.weights import read_weights

    _, meta = read_weights(path)
    return meta.get("preprocess")


def resolve_geometry(cfg: TrainConfig, pre: dict[str, Any] | None) -> list[str]:
    """Fill in image_size/resize left as None (the finetune recipe) from the weights, so that a
    CIFAR net fine-tunes at 32 px and an ImageNet net at 224 px. Returns notes for the banner."""
    notes = []
    if cfg.image_size is None:
        size = int(pre["input_size"]) if pre and pre.get("input_size") else 224
        cfg.image_size = size
        src = "the weights' metadata" if pre and pre.get("input_size") else "default"
        notes.append(f"image size {size} px ({src})")
    if cfg.resize is None:
        given = (
            pre.get("resize") if pre and int(pre.get("input_size") or 0) == cfg.image_size else None
        )
        # Section 3.4's test-time geometry: shorter side 256 for 224 crops, scaled alike.
        cfg.resize = int(given) if given else round(cfg.image_size * 256 / 224)
    return notes


def weights_normalization(
    pre: dict[str, Any], *, image_size: int
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(mode, mean, std) to normalise inputs as the weights' network saw them in training."""
    mean = torch.as_tensor(pre["mean"], dtype=torch.float32)
    std = torch.as_tensor(pre.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)
    if pre.get("mode") == "per_pixel":
        if mean.dim() == 3 and tuple(mean.shape[-2:]) == (image_size, image_size):
            return "per_pixel", mean, std
        # NOTE(paper): a per-pixel mean image of another size cannot be subtracted from these
        # crops; its per-channel average is the same offset up to the image's spatial variation.
        return "per_channel", mean.reshape(3, -1).mean(1), std.flatten()[:3]
    return "per_channel", mean.flatten(), std.flatten()


def choose_workers(requested: int | None, *, images: int, cores: int) -> int:
    """DataLoader worker processes. An explicit count is capped at the cores. Automatic: none
    below 256 images (decoding a small set in the main process costs less than feeding worker
    processes), else one per 256 images up to the cores less one for the training loop."""
    if requested is not None:
        return max(0, min(requested, cores))
    return max(0, min(images // 256, cores - 1, 8))


def fit_batch(batch_size: int, *, images: int, world_size: int) -> tuple[int, str | None]:
    """A batch no larger than the training set (a larger one yields no batch at all: the loader
    drops incomplete batches, so the run would never take a step)."""
    if batch_size <= images:
        return batch_size, None
    fitted = max(world_size, images // world_size * world_size)
    return fitted, f"batch size {batch_size} > {images} training images: using {fitted}"
