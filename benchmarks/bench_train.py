"""Training throughput: reslab's default path against the loop a user would otherwise write.

reference: ResNet-20 in eager fp32 NCHW, fed by torchvision transforms on PIL images (RandomCrop
with padding 4, RandomHorizontalFlip, ToTensor, Normalize) per sample through a DataLoader.
reslab: the same net in channels_last with bf16 autocast (where the CPU has native bf16), fed by
the on-device TensorLoader (whole split as one uint8 tensor, batched pad/crop/flip).
Same model, optimizer, batch (--batch, 128 by default) and real CIFAR-10 images; prints img/s,
the ratio, and the fraction of the machine's measured bf16 matmul peak that the training step
reaches.

    python benchmarks/bench_train.py --data ../shared/data [--steps 30] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.transforms as T
from PIL import Image
from reslab.engine.precision import autocast, resolve_precision

from common import hardware, load_average, matmul_peak
from reslab.analysis.complexity import count_macs
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.engine.data_setup import cifar_preprocess
from reslab.engine.schedules import make_sgd
from reslab.models import create_model


class PILCifar(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # [N, 32, 32, 3] as PIL wants
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def time_steps(model, batches, steps: int, warmup: int, precision: str) -> float:
    """Images/s over `steps` training steps after `warmup` steps (data loading included)."""
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    dev = torch.device("cpu")
    it = iter(batches)
    n, t0 = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        with autocast(precision, dev):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            n += len(y)
    loss.item()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="128: section 4.2; 256: cifar10-fast")
    args = p.parse_args()
    print(hardware())
    if load_average() > 1.5:
        print(f"WARNING: load average {load_average():.1f}: the machine is busy, figures are low")
    train = load_cifar(args.data, split="train")
    torch.manual_seed(0)

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean, std)])  # fmt: skip
    ref_loader = torch.utils.data.DataLoader(
        PILCifar(train.images, train.labels, tf), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0,
    )  # fmt: skip
    ref_model = create_model(args.model)
    ref = time_steps(ref_model, ref_loader, args.steps, args.warmup, "fp32")

    dev = torch.device("cpu")
    precision = resolve_precision("auto", dev)
    pre = cifar_preprocess("per_pixel", train.images)
    loader = TensorLoader(train.images, train.labels, batch_size=args.batch, preprocess=pre,
                          train=True, channels_last=True)  # fmt: skip
    ours_model = create_model(args.model).to(memory_format=torch.channels_last)
    ours = time_steps(ours_model, (b for _ in range(100) for b in loader), args.steps,
                      args.warmup, precision)  # fmt: skip

    compiled_model = torch.compile(create_model(args.model).to(memory_format=torch.channels_last))
    compiled = time_steps(compiled_model, (b for _ in range(100) for b in loader), args.steps,
                          args.warmup + 3, precision)  # fmt: skip

    macs = count_macs(create_model(args.model), 32)
    peak_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32 = matmul_peak(torch.float32)
    flops_per_img = 3 * 2 * macs  # forward + backward (2x forward), 2 FLOPs per multiply-add
    print(
        f"\n{args.model} training, batch {args.batch}, {args.steps} timed steps after {args.warmup}"
    )
    print(f"{'path':<58}{'img/s':>9}{'ratio':>8}{'TFLOP/s':>9}{'of bf16 peak':>14}")
    rows = [
        ("reference: eager fp32 NCHW, PIL/torchvision DataLoader", ref),
        (f"reslab: {precision} autocast, channels_last, on-device data", ours),
        ("reslab --compile: the same + torch.compile (after compiling)", compiled),
    ]
    for name, ips in rows:
        tf_s = ips * flops_per_img
        print(f"{name:<58}{ips:>9.0f}{ips / ref:>7.2f}x{tf_s / 1e12:>9.3f}"
              f"{100 * tf_s / peak_bf16:>13.1f}%")  # fmt: skip
    print(f"measured matmul peak: bf16 {peak_bf16 / 1e12:.3f} TFLOP/s, "
          f"fp32 {peak_fp32 / 1e12:.3f} TFLOP/s (2048^2, all threads)")  # fmt: skip


if __name__ == "__main__":
    main()
