"""Images/s of reslab's data pipelines beside what a user would otherwise write, in one run.

Baseline ("torchvision/PIL"): per-sample PIL images, torchvision transforms, ToTensor and
Normalize, through a DataLoader - the CIFAR10/ImageFolder tutorial pattern.
Ours: CIFAR = the whole split as one uint8 tensor on the device, batched pad/crop/flip there
(TensorLoader); ImageNet = torchvision.io decoding + fused uint8 resize-crop in the workers,
PCA lighting and per-pixel mean batched on the device.

    PYTHONPATH=src python benchmarks/bench_data.py --data ../shared/data
    PYTHONPATH=src python benchmarks/bench_data.py --cifar-images 51200 --imagenet-images 2000

Both sides of a pair get the same number of images, batch size and DataLoader workers; timing
starts once the first batch has arrived (worker start-up excluded) and ends after a device sync.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from reslab.data.cifar import load_cifar, mean_image
from reslab.data.folder import ImageFolder
from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from reslab.data.transforms import (
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    PCALighting,
    imagenet_train_transform,
    prepare_batch,
)


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    # Other processes on a small machine distort every figure (a busy core stalls torch's
    # intra-op threads); the 1-minute load average says how quiet it was.
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}){load}{gpu}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches: Iterable, device: torch.device, consume) -> tuple[float, int]:
    """images/s over the batches after the first (start-up excluded)."""
    it = iter(batches)
    consume(next(it))
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += consume(b)
    _sync(device)
    return n / (time.perf_counter() - t0), n


# --- CIFAR -------------------------------------------------------------------------------


class PilCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: numpy HWC -> PIL -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, 32, 32, 3]
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def bench_cifar(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    data = load_cifar(args.data, split="train")
    n = min(args.cifar_images, len(data.labels))
    images, labels = data.images[:n], data.labels[:n]
    bs = args.cifar_batch

    def to_device(b) -> int:
        x, y = b
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y.to(device, non_blocking=True)
        return len(y)

    base_t = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ]
    )
    loader = DataLoader(
        PilCifar(images, labels, base_t),
        batch_size=bs,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    base, nb = timed(loader, device, to_device)

    pre = Preprocess(kind="cifar", mode="per_pixel", mean=mean_image(images), std=[1.0] * 3)
    ours_loader = TensorLoader(
        images.to(device), labels, batch_size=bs, preprocess=pre, train=True, seed=0
    )
    ours, no = timed(ours_loader, device, lambda b: len(b[1]))
    print(f"CIFAR-10 train   baseline {base:9.0f} img/s ({nb} images)   ours {ours:9.0f} img/s "
          f"({no} images)   ratio {ours / base:5.1f}x   (target >= 5x)")  # fmt: skip
    return base, ours


# --- ImageNet-style folder ----------------------------------------------------------------


def make_jpegs(root: Path, *, count: int, classes: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs (smooth colour fields with texture), quality 90, `size` = (w, h)."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        d = root / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)


class PilRandomShorterSide:
    """Section 3.4's random shorter side, as a user would write it for PIL."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return TF.resize(img, random.randint(256, 480))


class PerSampleLighting:
    """AlexNet PCA lighting on one CHW float tensor (the usual per-sample implementation)."""

    def __init__(self) -> None:
        self.val = torch.tensor(IMAGENET_PCA_EIGVAL)
        self.vec = torch.tensor(IMAGENET_PCA_EIGVEC)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * 0.1
        return x + (self.vec @ (alpha * self.val)).view(3, 1, 1)


def bench_imagenet(
    args: argparse.Namespace, device: torch.device, root: Path
) -> tuple[float, float]:
    bs = args.imagenet_batch
    kw = {"batch_size": bs, "shuffle": True, "num_workers": args.workers, "drop_last": True,
          "pin_memory": device.type == "cuda"}  # fmt: skip
    if args.workers:
        kw["prefetch_factor"] = 4
    base_t = T.Compose(
        [
            PilRandomShorterSide(),
            T.RandomCrop(224),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            PerSampleLighting(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def to_device(b) -> int:
        x, y = b
        x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y.to(device, non_blocking=True)
        return len(y)

    base, nb = timed(
        DataLoader(tvd.ImageFolder(str(root), transform=base_t), **kw), device, to_device
    )

    light = PCALighting.imagenet().to(device)
    pre = Preprocess(
        kind="imagenet", input_size=224, mode="per_channel", mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    ds = ImageFolder(root, transform=imagenet_train_transform(), min_size=224)

    def ours_step(b) -> int:
        x, y = b
        prepare_batch(x, preprocess=pre, device=device, lighting=light)
        y.to(device, non_blocking=True)
        return len(y)

    ours, no = timed(DataLoader(ds, **kw), device, ours_step)
    print(f"ImageNet train   baseline {base:9.0f} img/s ({nb} images)   ours {ours:9.0f} img/s "
          f"({no} images)   ratio {ours / base:5.1f}x   (target >= 1.5x)")  # fmt: skip
    return base, ours


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=os.environ.get("RESLAB_DATA", "../shared/data"),
                   help="directory holding cifar-10-batches-py")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cifar-images", type=int, default=12800)
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--imagenet-images", type=int, default=320)
    p.add_argument("--imagenet-batch", type=int, default=32)
    p.add_argument("--image-size", default="500x375", help="generated JPEGs, WxH")
    p.add_argument("--jpeg-dir", default=None, help="reuse/keep the generated JPEGs here")
    p.add_argument("--only", choices=["cifar", "imagenet"], default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("hardware:", hardware(device))
    print(f"device {device}, DataLoader workers {args.workers} (both sides)")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy (load average above half the cores); "
              "figures below are not reliable - rerun on a quiet machine")  # fmt: skip
    if args.only != "imagenet":
        bench_cifar(args, device)
    if args.only != "cifar":
        w, h = (int(v) for v in args.image_size.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.jpeg_dir or tmp) / f"jpegs_{w}x{h}_{args.imagenet_images}"
            if not root.exists():
                t0 = time.perf_counter()
                make_jpegs(root, count=args.imagenet_images, classes=10, size=(w, h))
                print(
                    f"generated {args.imagenet_images} JPEGs {w}x{h} in {time.perf_counter() - t0:.1f}s"
                )
            bench_imagenet(args, device, root)


if __name__ == "__main__":
    main()
