"""Data for a training run: the loaders, the class names and the normalisation, from a config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from reslab.data.cifar import CifarSplit, load_cifar, mean_image
from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocess
from reslab.engine.config import TrainConfig
from reslab.engine.distributed import DistInfo


@dataclass
class RunData:
    train: Any  # iterable of (x, y) with state_dict()/load_state_dict() for exact resume
    evals: dict[str, Iterable]  # split name ("val", "test") -> loader
    classes: list[str]
    preprocess: Preprocess
    train_size: int  # images per training epoch


def cifar_preprocess(mode: str, train_images: torch.Tensor) -> Preprocess:
    if mode == "per_pixel":
        # Section 4.2: the per-pixel mean of the training images is subtracted (std 1).
        return Preprocess(kind="cifar", input_size=32, mode="per_pixel",
                          mean=mean_image(train_images), std=[1.0, 1.0, 1.0])  # fmt: skip
    if mode == "per_channel":
        m = train_images.float().mean((0, 2, 3)) / 255 if len(train_images) else CIFAR10_MEAN
        s = train_images.float().std((0, 2, 3)) / 255 if len(train_images) else CIFAR10_STD
        return Preprocess(kind="cifar", input_size=32, mode="per_channel", mean=m, std=s)
    raise ValueError(f"normalization must be per_pixel or per_channel, got {mode!r}")


def build_cifar(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> RunData:
    if cfg.download:
        from reslab.data.cifar import download_cifar

        download_cifar(cfg.data, dataset=cfg.dataset)
    train_split = "train45k" if cfg.val_split else "train"
    train = load_cifar(cfg.data, dataset=cfg.dataset, split=train_split)
    if cfg.train_subset:
        train = CifarSplit(train.images[: cfg.train_subset], train.labels[: cfg.train_subset],
                           train.classes)  # fmt: skip
    pre = cifar_preprocess(cfg.normalization, train.images)
    dtype = torch.get_default_dtype()  # float32 unless a caller (an exactness test) sets it
    lighting = None
    if cfg.pca_lighting:
        from reslab.data.stats import compute_stats

        # The eigenvectors/values of the 3x3 RGB covariance of the images this run trains on.
        chunks = (train.images[i : i + 5000] for i in range(0, len(train.images), 5000))
        lighting = compute_stats(chunks, source=f"{cfg.dataset}:{train_split}").lighting()

    def loader(split: str, *, is_train: bool) -> TensorLoader:
        part = train if is_train else load_cifar(cfg.data, dataset=cfg.dataset, split=split)
        if not is_train and cfg.eval_subset:
            n = cfg.eval_subset
            part = CifarSplit(part.images[:n], part.labels[:n], part.classes)
        return TensorLoader(
            part.images.to(device), part.labels.to(device), batch_size=cfg.batch_size if is_train
            else 500 * dist.world_size, preprocess=pre, train=is_train, seed=cfg.seed,
            pad=cfg.pad, flip=cfg.flip, rank=dist.rank, world_size=dist.world_size,
            channels_last=cfg.channels_last, dtype=dtype, lighting=lighting if is_train else None,
        )  # fmt: skip

    evals: dict[str, Iterable] = {}
    for name in cfg.eval_splits:
        if name == "val" and cfg.val_split:
            evals["val"] = loader("val5k", is_train=False)
        elif name == "test":
            evals["test"] = loader("test", is_train=False)
    return RunData(loader(train_split, is_train=True), evals, train.classes, pre, len(train.labels))


def folder_preprocess(cfg: TrainConfig) -> tuple[Preprocess, torch.nn.Module | None]:
    """Normalisation and PCA lighting for image folders, from a `reslab data stats` file if given.

    NOTE(paper): without a stats file the ImageNet per-channel mean/std stand in for the paper's
    per-pixel mean (for random crops of varying position the two are nearly the same offset).
    """
    from reslab.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from reslab.data.transforms import PCALighting

    geometry = dict(kind="imagenet", input_size=cfg.image_size, resize=cfg.resize)
    if cfg.stats:
        from reslab.data.stats import load_stats

        stats = load_stats(cfg.stats)
        pre = stats.preprocess(mode=cfg.normalization, **geometry)
        lighting = stats.lighting() if cfg.pca_lighting else None
    else:
        pre = Preprocess(**geometry, mode="per_channel", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        lighting = PCALighting.imagenet() if cfg.pca_lighting else None
    return pre, lighting


def build_folder(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> RunData:
    """DIR/train and DIR/val (class subfolders) when present, else DIR is the training set."""
    import os
    from pathlib import Path

    from reslab.data.folder import ImageFolder
    from reslab.data.loaders import FolderLoader
    from reslab.data.transforms import (
        alexnet_train_transform,
        center_crop_transform,
        imagenet_train_transform,
    )

    root = Path(cfg.data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if (root / "val").is_dir() else None
    if cfg.folder_augment == "imagenet":
        # Section 3.4: shorter side in [256, 480] for 224 crops; scaled with `resize` elsewhere.
        scale = (cfg.resize, round(cfg.resize * 480 / 256))
        train_tf = imagenet_train_transform(crop_size=cfg.image_size, shorter_side=scale)
    elif cfg.folder_augment == "alexnet":
        train_tf = alexnet_train_transform(resize=cfg.resize, crop_size=cfg.image_size)
    else:
        raise ValueError(f"folder_augment must be imagenet or alexnet, got {cfg.folder_augment!r}")
    workers = min(cfg.workers, os.cpu_count() or 1)
    train_ds = ImageFolder(train_dir, transform=train_tf, min_size=cfg.image_size,
                           num_workers=workers)  # fmt: skip
    classes = list(train_ds.classes)
    pre, lighting = folder_preprocess(cfg)
    if cfg.train_subset:
        train_ds = torch.utils.data.Subset(train_ds, range(min(cfg.train_subset, len(train_ds))))
    common = dict(
        preprocess=pre,
        device=device,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        workers=workers,
        channels_last=cfg.channels_last,
    )
    train = FolderLoader(train_ds, batch_size=cfg.batch_size, train=True, lighting=lighting,
                         **common)  # fmt: skip
    evals: dict[str, Iterable] = {}
    if val_dir is not None and "val" in cfg.eval_splits:
        tf = center_crop_transform(resize=cfg.resize, crop_size=cfg.image_size)
        val_ds = ImageFolder(val_dir, transform=tf, classes=classes, num_workers=workers)
        if cfg.eval_subset:
            val_ds = torch.utils.data.Subset(val_ds, range(min(cfg.eval_subset, len(val_ds))))
        evals["val"] = FolderLoader(val_ds, batch_size=max(cfg.batch_size, dist.world_size),
                                    train=False, **common)  # fmt: skip
    return RunData(train, evals, classes, pre, len(train_ds))


def build_data(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> RunData:
    if cfg.dataset in ("cifar10", "cifar100"):
        return build_cifar(cfg, device, dist)
    if cfg.dataset == "folder":
        return build_folder(cfg, device, dist)
    raise ValueError(f"dataset must be cifar10, cifar100 or folder, got {cfg.dataset!r}")
