"""Data set statistics that training uses: the per-pixel mean image, per-channel mean/std, and
the PCA (eigenvalues/eigenvectors) of the 3x3 RGB covariance for AlexNet's colour augmentation.

All on the 0-1 pixel scale, accumulated exactly in float64 over uint8 batches. Saved as a small
torch file that loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from reslab.data.cifar import DIRS, DataError, load_cifar
from reslab.data.preprocess import Preprocess
from reslab.data.transforms import PCALighting, center_crop_transform
from reslab.errors import TorchScriptFileError, safe_torch_load
from reslab.runtime.checkpoint import save_atomic

__all__ = [
    "DataStats",
    "cifar_datasets",
    "compute_cifar_stats",
    "compute_folder_stats",
    "compute_stats",
    "load_stats",
    "save_stats",
]

_FORMAT = "reslab-stats"


@dataclass
class DataStats:
    """mean_image float [3, H, W]; mean/std 3 values; eigval descending; eigvec [3, 3] with the
    eigenvectors as COLUMNS (row r = channel R, G, B), the layout of IMAGENET_PCA_EIGVEC."""

    mean_image: Tensor
    mean: list[float]
    std: list[float]
    eigval: list[float]
    eigvec: list[list[float]]
    count: int
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": 1,
            "mean_image": self.mean_image.clone(),
            "mean": self.mean,
            "std": self.std,
            "eigval": self.eigval,
            "eigvec": self.eigvec,
            "count": self.count,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataStats:
        if d.get("format") != _FORMAT:
            raise DataError(
                f"not a reslab stats file (format={d.get('format')!r}); make one with `reslab data stats DIR`"
            )
        return cls(
            mean_image=torch.as_tensor(d["mean_image"], dtype=torch.float32),
            mean=list(d["mean"]),
            std=list(d["std"]),
            eigval=list(d["eigval"]),
            eigvec=[list(r) for r in d["eigvec"]],
            count=int(d["count"]),
            source=str(d.get("source", "")),
        )

    def preprocess(
        self,
        *,
        mode: str = "per_pixel",
        kind: str = "imagenet",
        input_size: int | None = None,
        resize: int | None = None,
        square: bool = False,
    ) -> Preprocess:
        """Normalisation from these statistics: per_pixel (mean image, std 1: the paper's) or
        per_channel (mean and std)."""
        size = input_size or int(self.mean_image.shape[-1])
        per_pixel = mode == "per_pixel"
        return Preprocess(
            kind=kind,
            input_size=size,
            resize=resize,
            square=square,
            mode=mode,
            mean=self.mean_image if per_pixel else self.mean,
            std=[1.0, 1.0, 1.0] if per_pixel else self.std,
        )

    def lighting(self, *, alphastd: float = 0.1) -> PCALighting:
        """AlexNet PCA colour augmentation with this data set's eigenvalues/vectors."""
        return PCALighting(eigval=self.eigval, eigvec=self.eigvec, alphastd=alphastd)

    def describe(self) -> str:
        f = lambda v: "(" + ", ".join(f"{x:.4f}" for x in v) + ")"  # noqa: E731
        h, w = self.mean_image.shape[-2:]
        return "\n".join([
            f"images: {self.count}   source: {self.source}",
            f"mean image: [3, {h}, {w}]",
            f"per-channel mean (RGB, 0-1): {f(self.mean)}",
            f"per-channel std  (RGB, 0-1): {f(self.std)}",
            f"PCA eigenvalues: {f(self.eigval)}",
            "PCA eigenvector matrix (rows R, G, B; column i = eigenvector i): " + ", ".join(f(r) for r in self.eigvec),
        ])  # fmt: skip


def compute_stats(batches: Iterable[Tensor], *, source: str = "") -> DataStats:
    """Statistics of uint8 batches [N, 3, H, W] (all the same H, W), streamed."""
    img_sum: Tensor | None = None
    s1 = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, 3, dtype=torch.float64)
    n = pixels = 0
    for x in batches:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"compute_stats wants uint8 [N, 3, H, W] batches, got {x.dtype} {tuple(x.shape)}"
            )
        x = x.cpu()
        b = x.sum(0, dtype=torch.int64).to(torch.float64)
        img_sum = b if img_sum is None else img_sum + b
        p = x.transpose(0, 1).reshape(3, -1).to(torch.float64)  # [3, N*H*W]
        s1 += p.sum(1)
        s2 += p @ p.T
        n += x.shape[0]
        pixels += p.shape[1]
    if img_sum is None or n == 0:
        raise DataError(f"{source or 'data'}: no images to compute statistics from")
    mean = s1 / pixels / 255.0
    cov = s2 / pixels / 255.0**2 - torch.outer(mean, mean)
    val, vec = torch.linalg.eigh(cov)  # ascending
    val, vec = val.flip(0), vec.flip(1)
    # eigh's signs are arbitrary: fix them so each eigenvector's components sum to <= 0 (the
    # published ImageNet p1 is all negative). The augmentation is symmetric in the sign.
    vec = vec * torch.where(vec.sum(0) > 0, -1.0, 1.0)
    return DataStats(
        mean_image=(img_sum / (255.0 * n)).to(torch.float32),
        mean=mean.tolist(),
        std=cov.diagonal().clamp_min(0).sqrt().tolist(),
        eigval=val.clamp_min(0).tolist(),
        eigvec=vec.tolist(),
        count=n,
        source=source,
    )


def cifar_datasets(root: str | Path) -> list[tuple[str, Path]]:
    """CIFAR data sets at `root` -> [(name, root holding its directory)]; `root` may be the
    parent of cifar-10-batches-py / cifar-100-python or one of them."""
    from reslab.data.folder import check_listable

    root = Path(root)
    check_listable(root)
    found = []
    for name, d in DIRS.items():
        if (root / d).is_dir():
            found.append((name, root))
        elif root.name == d and root.is_dir():
            found.append((name, root.parent))
    return found


def compute_cifar_stats(
    root: str | Path, *, dataset: str = "cifar10", split: str = "train"
) -> DataStats:
    """Statistics of a CIFAR training split (train = 50k, or train45k)."""
    data = load_cifar(root, dataset=dataset, split=split)
    chunks = (data.images[i : i + 5000] for i in range(0, len(data.images), 5000))
    return compute_stats(chunks, source=f"{dataset}:{split} {Path(root).resolve()}")


def compute_folder_stats(
    root: str | Path,
    *,
    resize: int = 256,
    crop_size: int = 224,
    labels_file: str | Path | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    max_pixels: int | None = None,
) -> DataStats:
    """Statistics of an image folder, each image seen as its centre view (shorter side
    `resize`, centre `crop_size` crop): the mean image is [3, crop_size, crop_size].

    NOTE(paper): the paper does not say at what geometry its ImageNet mean image was taken; we
    use the evaluation view, which random crops average to. max_images draws a fixed random
    subset (seed) for a quicker estimate.
    """
    from reslab.data.folder import ImageFolder, folder_layout

    # The training images only, as training reads the folder: never a val/ split.
    train_dir, _, classes = folder_layout(root) if labels_file is None else (root, None, None)
    ds = ImageFolder(
        train_dir,
        transform=center_crop_transform(resize=resize, crop_size=crop_size),
        labels_file=labels_file,
        classes=classes,
        min_size=crop_size,
        num_workers=num_workers,
        max_pixels=max_pixels,
        on_bad="drop",  # a file that fails to decode is left out, not counted twice
        resize=resize,
    )
    subset: Any = ds
    if max_images is not None and max_images < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_images]
        subset = Subset(ds, idx.sort().values.tolist())
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_usable)  # fmt: skip
    stats = compute_stats((x for x, _ in loader if len(x)), source=str(Path(root).resolve()))
    skipped = ds.skipped()
    if skipped:
        stats.source += f" ({len(skipped)} files skipped while reading)"
    return stats


def _collate_usable(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, list]:
    usable = [it for it in items if it is not None]
    if not usable:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), []
    return torch.stack([x for x, _ in usable]), [y for _, y in usable]


def save_stats(stats: DataStats, path: str | Path) -> Path:
    """Write atomically; loads with `load_stats` (torch.load(weights_only=True))."""
    save_atomic(stats.to_dict(), path)
    return Path(path)


def load_stats(path: str | Path) -> DataStats:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"stats file {path} does not exist; make it with `reslab data stats DIR --out {path}`"
        )
    try:
        raw = safe_torch_load(path)
    except TorchScriptFileError:
        raise DataError(f"stats file {path} is a TorchScript export, not reslab stats; make it "
                        f"with `reslab data stats DIR --out {path}`") from None  # fmt: skip
    except Exception as e:  # torch.load's errors: unpickling refused, truncated zip, not torch
        # NOTE: never pass on torch's advice to retry with weights_only=False (that runs code).
        raise DataError(
            f"stats file {path} cannot be loaded safely ({type(e).__name__}); make it again with "
            f"`reslab data stats DIR --out {path}`"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(f"stats file {path} holds a {type(raw).__name__}, not reslab stats; "
                        f"make it again with `reslab data stats DIR --out {path}`")  # fmt: skip
    try:
        stats = DataStats.from_dict(raw)
        stats.preprocess(mode="per_channel")  # the shapes and values it will be used with
    except DataError as e:
        raise DataError(f"stats file {path}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise DataError(f"stats file {path} is damaged ({type(e).__name__}: {e}); make it again "
                        f"with `reslab data stats DIR --out {path}`") from None  # fmt: skip
    return stats
