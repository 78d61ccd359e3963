"""`reslab data check`: scan a data set without training and report the truth about it."""

from __future__ import annotations

from pathlib import Path

import torch

from reslab.data.cifar import DataError, _load_cached, load_cifar
from reslab.data.folder import folder_layout, scan_folder
from reslab.data.stats import cifar_datasets

__all__ = ["check_cifar", "check_data", "check_folder"]


def check_cifar(root: str | Path, *, dataset: str) -> str:
    """Read every CIFAR file (shapes, label ranges are validated by the reader) and count."""
    _load_cached.cache_clear()  # a check reads the files as they are now, not a cached copy
    lines = [f"{dataset} at {Path(root).resolve()}"]
    for split in ("train", "test"):
        d = load_cifar(root, dataset=dataset, split=split)
        counts = torch.bincount(d.labels, minlength=len(d.classes) or 1).tolist()
        lines.append(
            f"  {split}: {len(d.labels)} images {tuple(d.images.shape[1:])} uint8, "
            f"{len(counts)} classes, per class min {min(counts)} / max {max(counts)}"
        )
        if split == "train":
            classes = d.classes
            train_counts = counts
        else:
            test_counts = counts
    lines.append("  images per class (train / test):")
    for name, a, b in zip(classes, train_counts, test_counts):
        lines.append(f"    {name:<16} {a:>6} / {b:>6}")
    n45, n5 = (
        len(load_cifar(root, dataset=dataset, split=s).labels) for s in ("train45k", "val5k")
    )
    lines.append(f"  paper split (fixed seed): train45k {n45} / val5k {n5}")
    return "\n".join(lines)


def check_folder(
    root: str | Path,
    *,
    quick: bool = False,
    labels_file: str | Path | None = None,
    min_size: int = 224,
    max_pixels: int | None = None,
    num_workers: int = 0,
) -> str:
    """Decode every image (or only read headers with quick=True) and report, split by split as
    training reads the folder (a val/ beside the class folders is the validation set)."""
    opts = dict(check="header" if quick else "decode", min_size=min_size, max_pixels=max_pixels,
                num_workers=num_workers, warn=False)  # fmt: skip
    if labels_file is not None:
        return scan_folder(root, labels_file=labels_file, **opts).format()  # type: ignore[arg-type]
    train_dir, val_dir, classes = folder_layout(root)
    train = scan_folder(train_dir, classes=classes, **opts)  # type: ignore[arg-type]
    if val_dir is None:
        return train.format()
    val = scan_folder(val_dir, classes=train.classes, unknown="refuse", **opts)  # type: ignore[arg-type]
    return "\n".join(["training set:", train.format(), "", f"validation set ({val_dir}):",
                      val.format()])  # fmt: skip


def check_data(root: str | Path, **folder_options: object) -> str:
    """CIFAR directories (or a parent of them) are read as CIFAR; anything else as a folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist (check the path)")
    found = cifar_datasets(root)
    if found:
        return "\n".join(check_cifar(r, dataset=name) for name, r in found)
    return check_folder(root, **folder_options)  # type: ignore[arg-type]
