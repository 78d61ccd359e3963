"""Training throughput: reslab's default path against the loop a user would otherwise write.

reference: ResNet-20 in eager fp32 NCHW, fed by torchvision transforms on PIL images (RandomCrop
with padding 4, RandomHorizontalFlip, ToTensor, Normalize) per sample through a DataLoader.
reslab: the same net in channels_last with bf16 autocast (where the CPU has native bf16), fed by
the on-device TensorLoader (whole split as one uint8 tensor, batched pad/crop/flip), with the CPU
paths `reslab train` turns on, by the same call (models/cpu_paths.py): each relu(bn(x) [+
shortcut]) as one fused kernel (models/bn_act.py), the 3x3 weight gradients from the AMX kernel
or tiling (models/tiled_wgrad.py); beside it the same without the BN kernel (fused_bn_act=false)
and with torch.compile. (Before session 27 this benchmark set only the BN kernel's flag.) All four paths and the
matmul peak are timed in alternating rounds and each takes its best round, so that a drift
in the machine's speed (large on this VM) does not fall on one path only; the median over
rounds of each round's ratio to the reference is printed beside the best rounds.
Same model, optimizer, batch (--batch, 128 by default) and real CIFAR-10 images; prints img/s,
the ratio, and the fraction of the machine's measured matmul peak that the training step
reaches: the bf16 peak where the default trains in bf16, the fp32 peak on a CPU without native
bf16 (e.g. AMD Zen 3), where the default trains in fp32 and an emulated bf16 peak would
flatter every path.

    python benchmarks/bench_train.py --data ../shared/data [--steps 30 --rounds 3] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import Image

from common import (
    conv_ceiling,
    format_profile,
    hardware,
    load_average,
    matmul_peak,
    peak_dtype,
    step_profile,
)
from reslab.analysis.complexity import count_macs
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.engine.schedules import make_sgd
from reslab.models import create_model
from reslab.models.bn_act import kernel_status
from reslab.models.cpu_paths import use_cpu_training_paths
from reslab.runtime.precision import autocast, resolve_precision


class PILCifar(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # [N, 32, 32, 3] as PIL wants
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def make_step(model, batches, precision: str):
    """One training step (data included) as a function returning its batch size."""
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    dev = torch.device("cpu")
    it = iter(batches)

    def step() -> int:
        with torch.profiler.record_function("data"):
            x, y = next(it)
        with autocast(precision, dev):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(y)

    return step


def time_steps(step, steps: int, warmup: int) -> float:
    """Images/s over `steps` training steps after `warmup` steps (data loading included)."""
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    for _ in range(steps):
        n += step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="128: section 4.2; 256: cifar10-fast")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the paths")
    args = p.parse_args()
    # An empty inductor cache, so that the compile time printed is what a first run pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="reslab-bench-inductor-")
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
    ref_step = make_step(ref_model, (b for _ in range(100) for b in ref_loader), "fp32")

    dev = torch.device("cpu")
    precision = resolve_precision("auto", dev)
    # The denominator is the peak of the arithmetic the default runs in: bf16 where the CPU has
    # it natively, else fp32 (bf16 there is emulated, ~100x slower than fp32 on AMD Zen 3).
    pdtype, peak_name = peak_dtype(precision)
    pre = cifar_preprocess("per_pixel", train.images)
    loader = TensorLoader(train.images, train.labels, batch_size=args.batch, preprocess=pre,
                          train=True, channels_last=True)  # fmt: skip
    # reslab's default, with the paths the trainer turns on (the same call): relu(bn(x)
    # [+ shortcut]) as one fused kernel, the 3x3 weight gradients from the AMX kernel or tiling.
    ours_model = create_model(args.model).to(memory_format=torch.channels_last)
    wgrad = use_cpu_training_paths(ours_model, precision=precision)[1]
    ours_step = make_step(ours_model, (b for _ in range(100) for b in loader), precision)
    # The same without the kernel (--set fused_bn_act=false): BN, ReLU and adds as eager ops.
    unfused_model = create_model(args.model).to(memory_format=torch.channels_last)
    use_cpu_training_paths(unfused_model, precision=precision, fused_bn_act=False)
    unfused_step = make_step(unfused_model, (b for _ in range(100) for b in loader), precision)
    compiled_model = torch.compile(create_model(args.model).to(memory_format=torch.channels_last))
    compiled_step = make_step(compiled_model, (b for _ in range(100) for b in loader), precision)
    t0 = time.perf_counter()
    compiled_step()  # compiles forward and backward
    compile_s = time.perf_counter() - t0

    # Alternating rounds, every path and the matmul peak in each: this VM's speed drifts (its
    # bf16 speed by up to 1.4x within minutes), so the ratios come from the same moments.
    paths = {"reference": ref_step, "default": ours_step, "unfused": unfused_step,
             "compiled": compiled_step}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in paths}
    peaks = []
    for i in range(args.rounds):
        order = list(paths)[i % len(paths) :] + list(paths)[: i % len(paths)]
        for k in order:
            rates[k].append(time_steps(paths[k], max(args.steps // args.rounds, 1), args.warmup))
        peaks.append(matmul_peak(pdtype))
    ref, ours, unfused, compiled = (max(rates[k]) for k in paths)
    profiles = [
        format_profile(
            step_profile(ours_step),
            f"reslab default ({precision}, {kernel_status()}; wgrad: {wgrad})",
        ),
        format_profile(
            step_profile(unfused_step), f"reslab fused_bn_act=false ({precision} eager)"
        ),
        format_profile(step_profile(compiled_step), "reslab --compile"),
    ]

    macs = count_macs(create_model(args.model), 32)
    peak = max(peaks)
    other_name = "fp32" if peak_name == "bf16" else "bf16"
    peak_other = matmul_peak(torch.float32 if peak_name == "bf16" else torch.bfloat16)
    flops_per_img = 3 * 2 * macs  # forward + backward (2x forward), 2 FLOPs per multiply-add
    print(f"\n{args.model} training, batch {args.batch}, {args.steps} timed steps per path in "
          f"{args.rounds} alternating rounds (each after {args.warmup} untimed); best round")  # fmt: skip
    print(f"{'path':<58}{'img/s':>9}{'ratio':>8}{'TFLOP/s':>9}{f'of {peak_name} peak':>14}")
    mode = precision if precision == "fp32" else f"{precision} autocast"
    rows = [
        ("reference: eager fp32 NCHW, PIL/torchvision DataLoader", ref),
        (f"reslab: {mode}, channels_last, on-device data", ours),
        ("  the same with fused_bn_act=false (eager BN, ReLU, adds)", unfused),
        ("reslab --compile: the same + torch.compile (after compiling)", compiled),
    ]
    for name, ips in rows:
        tf_s = ips * flops_per_img
        print(f"{name:<58}{ips:>9.0f}{ips / ref:>7.2f}x{tf_s / 1e12:>9.3f}"
              f"{100 * tf_s / peak:>13.1f}%")  # fmt: skip
    print("img/s per round: " + "; ".join(
        f"{k} " + " ".join(f"{v:.0f}" for v in rates[k]) for k in paths
    ) + f"; {peak_name} peak TFLOP/s " + " ".join(f"{v / 1e12:.3f}" for v in peaks))  # fmt: skip
    # Best rounds can come from different moments of a drifting VM (one path's best round may
    # fall in a fast minute); ratios within each round, then their median, are the robust view.
    med = {k: statistics.median(r / f for r, f in zip(rates[k], rates["reference"])) for k in paths}
    med_peak = {k: statistics.median(r * flops_per_img / p for r, p in zip(rates[k], peaks))
                for k in paths}  # fmt: skip
    print("median over rounds of the same round's ratio to the reference (and share of that "
          f"round's {peak_name} peak): " + "; ".join(f"{k} {med[k]:.2f}x ({med_peak[k]:.1%})"
                                             for k in paths if k != "reference"))  # fmt: skip
    print(f"measured matmul peak: {peak_name} {peak / 1e12:.3f} TFLOP/s (best round), "
          f"{other_name} {peak_other / 1e12:.3f} TFLOP/s (square matmuls, all threads)")  # fmt: skip
    # Issue 17's two targets in one unit: 4x the reference is only reachable where it asks for
    # less than the whole measured peak (on a CPU whose fp32 path is already efficient it
    # cannot be), and 30% of the peak expressed as a multiple of the reference.
    need = 4 * ref * flops_per_img / peak
    at30 = 0.3 * peak / flops_per_img
    print(f"4x the reference = {4 * ref:.0f} img/s = {need:.0%} of the measured {peak_name} peak"
          f"{' (beyond this CPU)' if need > 1 else ''}; 30% of the peak = {at30:.0f} img/s = "
          f"{at30 / ref:.2f}x the reference")  # fmt: skip
    gain = compiled / ours - 1
    if gain > 0:
        repaid = compile_s * compiled / gain  # images whose saved time adds up to compile_s
        print(f"compiling took {compile_s:.0f} s (first step); {gain:+.1%} img/s afterwards: "
              f"repaid after ~{repaid / 1e3:.0f}k training images")  # fmt: skip
    else:
        print(f"compiling took {compile_s:.0f} s (first step) and does not pay: {gain:+.1%} img/s")
    print("\n" + "\n\n".join(profiles))
    conv_s, lines = conv_ceiling(create_model(args.model), batch=args.batch, dtype=pdtype)
    ceiling = args.batch / conv_s
    print(f"\nconvolutions alone ({peak_name} channels_last, timed shape by shape): {conv_s * 1e3:.1f} ms "
          f"per step -> ceiling {ceiling:.0f} img/s = {ceiling / ref:.2f}x the reference if every "
          "other op were free")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
