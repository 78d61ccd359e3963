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
    dtype = torch.float32

    def loader(split: str, *, is_train: bool) -> TensorLoader:
        part = (
            train
            if split == train_split
            else load_cifar(cfg.data, dataset=cfg.dataset, split=split)
        )
        if not is_train and cfg.eval_subset:
            n = cfg.eval_subset
            part = CifarSplit(part.images[:n], part.labels[:n], part.classes)
        return TensorLoader(
            part.images.to(device), part.labels.to(device), batch_size=cfg.batch_size if is_train
            else 500 * dist.world_size, preprocess=pre, train=is_train, seed=cfg.seed,
            pad=cfg.pad, flip=cfg.flip, rank=dist.rank, world_size=dist.world_size,
            channels_last=cfg.channels_last, dtype=dtype,
        )  # fmt: skip

    evals: dict[str, Iterable] = {}
    for name in cfg.eval_splits:
        if name == "val" and cfg.val_split:
            evals["val"] = loader("val5k", is_train=False)
        elif name == "test":
            evals["test"] = loader("test", is_train=False)
    return RunData(loader(train_split, is_train=True), evals, train.classes, pre, len(train.labels))


def build_data(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> RunData:
    if cfg.dataset in ("cifar10", "cifar100"):
        return build_cifar(cfg, device, dist)
    raise ValueError(f"dataset must be cifar10, cifar100 or folder, got {cfg.dataset!r}")
