"""Data for a training run: the loaders, the class names and the normalisation, from a config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from reslab.data import resolve_data_root
from reslab.data.cifar import CifarSplit, load_cifar, mean_image
from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocess
from reslab.runtime.distributed import DistInfo

if TYPE_CHECKING:  # annotations only: data/ never imports engine/
    from reslab.engine.config import TrainConfig


@dataclass
class RunData:
    train: Any  # iterable of (x, y) with state_dict()/load_state_dict() for exact resume
    evals: dict[str, Iterable]  # split name ("val", "test") -> loader
    classes: list[str]
    preprocess: Preprocess
    train_size: int  # images per training epoch
    notes: list[str] = field(default_factory=list)  # choices made for the user (start banner)


def cifar_preprocess(mode: str, train_images: torch.Tensor) -> Preprocess:
    if mode == "per_pixel":
        # Section 4.2: the per-pixel mean of the training images is subtracted (std 1).
        return Preprocess(kind="cifar", input_size=32, mode="per_pixel",
                          mean=mean_image(train_images), std=[1.0, 1.0, 1.0])  # fmt: skip
    if mode == "per_channel":
        if not len(train_images):
            return Preprocess(kind="cifar", input_size=32, mode="per_channel",
                              mean=CIFAR10_MEAN, std=CIFAR10_STD)  # fmt: skip
        # One fp32 copy for both statistics (50k images: 614 MB, ~0.7 s to make on 2 cores).
        pixels = train_images.float()
        m, s = pixels.mean((0, 2, 3)) / 255, pixels.std((0, 2, 3)) / 255
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

    # Progressive resizing (TrainConfig.small_size) switches at an iteration; the run's length
    # in iterations is fixed here the way iters_from_epochs will fix it.
    n_train = len(train.labels)
    total = round(cfg.epochs * n_train / cfg.batch_size) if cfg.epochs else cfg.iters
    small_iters = int(cfg.small_until * max(1, total)) if cfg.small_size else 0

    def loader(split: str, *, is_train: bool) -> TensorLoader:
        part = train if is_train else load_cifar(cfg.data, dataset=cfg.dataset, split=split)
        if not is_train and cfg.eval_subset:
            n = cfg.eval_subset
            part = CifarSplit(part.images[:n], part.labels[:n], part.classes)
        return TensorLoader(
            part.images.to(device), part.labels.to(device), batch_size=cfg.batch_size if is_train
            else 500 * dist.world_size, preprocess=pre, train=is_train, seed=cfg.seed,
            pad=cfg.pad, flip=cfg.flip, alternate_flip=cfg.alternate_flip, rank=dist.rank,
            world_size=dist.world_size,
            channels_last=cfg.channels_last, dtype=dtype, lighting=lighting if is_train else None,
            small_size=cfg.small_size if is_train else None, small_iters=small_iters,
        )  # fmt: skip

    evals: dict[str, Iterable] = {}
    for name in cfg.eval_splits:
        if name == "val" and cfg.val_split:
            evals["val"] = loader("val5k", is_train=False)
        elif name == "test":
            evals["test"] = loader("test", is_train=False)
    return RunData(loader(train_split, is_train=True), evals, train.classes, pre, len(train.labels))


def folder_preprocess(
    cfg: TrainConfig, *, resumed: Preprocess | None = None
) -> tuple[Preprocess, torch.nn.Module | None]:
    """Normalisation and PCA lighting for image folders: from a `reslab data stats` file if given,
    else as the initial weights' network was trained (fine-tuning), else ImageNet's statistics.

    NOTE(paper): without a stats file the ImageNet per-channel mean/std stand in for the paper's
    per-pixel mean. The subtracted mean is nearly the same (random crops of varying position and
    scale see the per-pixel mean averaged over positions); dividing by the std as well is not the
    paper's: it scales each channel's input by a constant, which conv1 and its BatchNorm absorb.
    `reslab data stats DIR` then `--set stats=FILE` gives the paper's per-pixel mean exactly.
    """
    from reslab.data.folder_defaults import weights_normalization, weights_preprocess
    from reslab.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from reslab.data.transforms import PCALighting

    # AlexNet's crops come from the image resized to resize x resize, in training and test alike.
    geometry = dict(kind="imagenet", input_size=cfg.image_size, resize=cfg.resize,
                    square=cfg.folder_augment == "alexnet")  # fmt: skip
    stats = None
    if cfg.stats:
        from reslab.data.stats import load_stats

        stats = load_stats(cfg.stats)
    wpre = None if stats or resumed is not None else weights_preprocess(cfg.weights)
    if resumed is not None:  # a resumed run normalises exactly as it did before
        pre = resumed
    elif stats is not None:
        pre = stats.preprocess(mode=cfg.normalization, **geometry)
    elif wpre is not None and wpre.get("mean") is not None:
        mode, mean, std = weights_normalization(wpre, image_size=int(cfg.image_size or 0))
        pre = Preprocess(**geometry, mode=mode, mean=mean, std=std)
    else:
        pre = Preprocess(**geometry, mode="per_channel", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    lighting = None
    if cfg.pca_lighting:
        lighting = stats.lighting() if stats is not None else PCALighting.imagenet()
    # config.yaml records what the run really does, not the recipe's default.
    cfg.normalization = pre.mode
    return pre, lighting


def build_folder(
    cfg: TrainConfig, device: torch.device, dist: DistInfo, *, resumed: Preprocess | None = None
) -> RunData:
    """DIR/train and DIR/val (class subfolders) when present, else DIR is the training set."""
    import os
    from pathlib import Path

    from reslab.data.folder import ImageFolder, folder_layout
    from reslab.data.folder_defaults import (
        choose_workers,
        fit_batch,
        resolve_geometry,
        weights_preprocess,
    )
    from reslab.data.loaders import FolderLoader
    from reslab.data.transforms import (
        alexnet_train_transform,
        center_crop_transform,
        imagenet_train_transform,
        ten_crop_transform,
    )

    root = Path(resolve_data_root(cfg.data))
    train_dir, val_dir, train_classes = folder_layout(root)
    unresolved = cfg.image_size is None or cfg.resize is None
    notes = resolve_geometry(cfg, weights_preprocess(cfg.weights) if unresolved else None)
    if cfg.folder_augment == "imagenet":
        # Section 3.4: shorter side in [256, 480] for 224 crops; scaled with `resize` elsewhere.
        scale = (cfg.resize, round(cfg.resize * 480 / 256))
        train_tf = imagenet_train_transform(crop_size=cfg.image_size, shorter_side=scale)
    elif cfg.folder_augment == "alexnet":
        train_tf = alexnet_train_transform(resize=cfg.resize, crop_size=cfg.image_size)
    else:
        raise ValueError(f"folder_augment must be imagenet or alexnet, got {cfg.folder_augment!r}")
    cores = os.cpu_count() or 1
    if train_classes is not None:
        # DIR/CLASS/* beside DIR/val/CLASS/*: val/ is the validation set, never a class of its
        # own (its images would be trained on, and the model would get an extra output).
        notes.append(f"validation: {val_dir} (not a class: its class folders are the val set)")
    train_ds = ImageFolder(train_dir, transform=train_tf, min_size=cfg.image_size,
                           classes=train_classes, num_workers=min(cfg.workers or cores, cores),
                           max_pixels=cfg.max_pixels)  # fmt: skip
    classes = list(train_ds.classes)
    with_images = [c for c, n in zip(classes, train_ds.report.per_class(), strict=True) if n]
    if len(with_images) < 2:
        from reslab.data.cifar import DataError

        # One class trains to loss 0 at once and teaches nothing.
        raise DataError(
            f"{train_dir} has images in {len(with_images)} class folder(s) "
            f"({', '.join(with_images) or 'none'}); a classifier needs at least two (one "
            "subfolder of images per class)"
        )
    asked = cfg.normalization  # folder_preprocess records what the run really does
    pre, lighting = folder_preprocess(cfg, resumed=resumed)
    if resumed is None and asked == "per_pixel" and pre.mode != "per_pixel":
        # NOTE(paper): folder_preprocess's fallback, said in the banner, not only in config.yaml.
        from reslab.data.preprocess import IMAGENET_MEAN

        imagenet = torch.allclose(pre.mean.flatten(), torch.tensor(IMAGENET_MEAN))
        notes.append(f"normalization: {'ImageNet' if imagenet else 'the weights'}' per-channel "
                     "mean/std, not the per-pixel mean the recipe asks for (section 3.4; no "
                     "stats file): `reslab data stats DIR --out FILE`, then --set stats=FILE")  # fmt: skip
    if cfg.eval_views == "ten-crop":
        # Section 3.4's 10-crop test on the image (shorter side `resize`), as `reslab eval
        # --views ten-crop` makes it: [10, 3, S, S] per image.
        eval_tf = ten_crop_transform(resize=cfg.resize, crop_size=cfg.image_size,
                                     square=pre.square)  # fmt: skip
    else:  # center; "flip" and "flip-shift" are made from the centre crop on the device
        eval_tf = center_crop_transform(resize=cfg.resize, crop_size=cfg.image_size,
                                        square=pre.square)  # fmt: skip
    held_out = None
    if val_dir is None and cfg.val_fraction > 0 and "val" in cfg.eval_splits:
        import copy

        from reslab.data.split import stratified_split

        # Not the paper's (ImageNet has its own val set): a folder without val/ gives up a seeded,
        # stratified share of its images so that the run has a validation error and a best.pt.
        train_idx, val_idx = stratified_split(train_ds.targets, fraction=cfg.val_fraction,
                                              seed=cfg.seed)  # fmt: skip
        if not val_idx:  # every class has a single image: none can be spared
            notes.append(f"validation: none (no class has 2 images to spare one of); add "
                         f"images or a {cfg.data}/val/ folder for a validation error and best.pt")  # fmt: skip
        else:
            held_out = copy.copy(train_ds)  # same files and skip marks, test-time transform
            held_out.transform = eval_tf
            held_out.resize = None if pre.square else cfg.resize  # what eval_tf resizes to
            held_out = held_out.select(val_idx)
            notes.append(f"validation: {len(val_idx)} of {len(train_ds)} images held out "
                         f"(val_fraction {cfg.val_fraction}, stratified, seed {cfg.seed})")  # fmt: skip
            train_ds = train_ds.select(train_idx)
    if cfg.train_subset:
        train_ds = train_ds.select(range(min(cfg.train_subset, len(train_ds))))
    workers = choose_workers(cfg.workers, images=len(train_ds), cores=cores)
    if cfg.fit_batch:  # otherwise the trainer refuses a batch larger than the training set
        cfg.batch_size, note = fit_batch(cfg.batch_size, images=len(train_ds),
                                         world_size=dist.world_size)  # fmt: skip
        notes += [note] if note else []
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
    if (val_dir is not None or held_out is not None) and "val" in cfg.eval_splits:
        val_ds = held_out
        if val_dir is not None:
            val_ds = ImageFolder(val_dir, transform=eval_tf, classes=classes, unknown="refuse",
                                 num_workers=min(cfg.workers or cores, cores),
                                 max_pixels=cfg.max_pixels,
                                 resize=None if pre.square else cfg.resize)  # fmt: skip
        if cfg.eval_subset:
            val_ds = val_ds.select(range(min(cfg.eval_subset, len(val_ds))))
        # Ten-crop: a tenth of the images per batch, so a batch holds as many crops as in training.
        per = cfg.batch_size // 10 if cfg.eval_views == "ten-crop" else cfg.batch_size
        evals["val"] = FolderLoader(val_ds, batch_size=max(per, dist.world_size), train=False,
                                    **common)  # fmt: skip
    return RunData(train, evals, classes, pre, len(train_ds), notes)


def check_data_exists(cfg: TrainConfig) -> None:
    """Refuse a --data path that does not exist (unless it is to be downloaded into) or is a
    file, in one line: here for the run, and once in `train --nproc`'s launcher, where each
    worker would otherwise say it."""
    from pathlib import Path

    from reslab.data.cifar import DataError

    root = Path(resolve_data_root(cfg.data))
    if not root.exists() and not cfg.download:
        raise DataError(
            f"--data {root} does not exist; give "
            + ("a folder with one subfolder of images per class" if cfg.dataset == "folder"
               else f"the directory for {cfg.dataset} (`reslab data download {root}` fetches it)"
               " or an image folder (one subfolder of images per class)")
        )  # fmt: skip
    if root.exists() and not root.is_dir():
        raise DataError(
            f"--data {root} is a file; give the directory that holds "
            + ("the class folders" if cfg.dataset == "folder" else "cifar-10-batches-py")
        )


def build_data(
    cfg: TrainConfig, device: torch.device, dist: DistInfo, *, resumed: Preprocess | None = None
) -> RunData:
    """The run's loaders. `resumed`: the preprocessing a resumed run's checkpoint stored, used
    for image folders instead of deriving it again (the initial weights file is not needed)."""
    check_data_exists(cfg)
    if cfg.dataset in ("cifar10", "cifar100"):
        return build_cifar(cfg, device, dist)
    if cfg.dataset == "folder":
        return build_folder(cfg, device, dist, resumed=resumed)
    raise ValueError(f"dataset must be cifar10, cifar100 or folder, got {cfg.dataset!r}")
