"""Option A's shortcut gradient added in place (layers._ConvSubsamplePad, session 24) against
autograd's sum of a zero-filled gradient, in one process.

A CIFAR ResNet's option-A blocks (the first of stages 2 and 3) read x twice: conv1 (stride 2)
and the shortcut (x[:, :, ::2, ::2], channels zero-padded). Autograd gives the shortcut a
zero-filled [N, C, H, W] gradient and adds it to conv1's input gradient; the combined op adds the
shortcut's gradient at the subsampled positions of conv1's input gradient in place (through the
fused kernel's `add_subsampled` on the CPU, torch's strided add_ elsewhere). First the add alone
at each stage's shape (the kernel against torch's strided add_), then reslab's default CPU
training step on real CIFAR-10 batches with the combined op on and off in alternating one-step
rounds (the VM's speed drifts within seconds: only per-round ratios mean anything).

    python benchmarks/ab_option_a.py --data ../shared/data [--models resnet20,resnet56]
        [--sizes 32] [--batch 128] [--rounds 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import cifar_default_step, hardware
from reslab.models import bn_act, layers


def _median_ms(f, reps: int = 50) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def add_alone(batch: int) -> None:
    ext = bn_act.load_kernel()
    if ext is None:
        print("the fused kernel could not be built here: torch's strided add_ is used")
        return
    print(f"shortcut gradient added into [N, C, H, W] at ::2, ::2 (bf16 channels_last, N={batch}):")
    cl = torch.channels_last
    for c, h in [(16, 32), (32, 16), (16, 24), (32, 12)]:
        dx = torch.randn(batch, c, h, h).bfloat16().contiguous(memory_format=cl)
        g = torch.randn(batch, 2 * c, h // 2, h // 2).bfloat16().contiguous(memory_format=cl)
        lo = c // 2
        torch_ms = _median_ms(lambda: dx[:, :, ::2, ::2].add_(g[:, lo : lo + c]))  # noqa: B023
        kernel_ms = _median_ms(lambda: ext.add_subsampled(dx, g, 2, lo))  # noqa: B023
        print(f"  {c:2d} -> {2 * c:2d} channels at {h}x{h}: torch add_ {torch_ms:.3f} ms, "
              f"kernel {kernel_ms:.3f} ms (x{torch_ms / kernel_ms:.1f})")  # fmt: skip


def steps(data: str, model_name: str, size: int, rounds: int, batch: int) -> None:
    precision, _model, step = cifar_default_step(data, model_name, batch=batch, size=size)
    combined = layers.PadShortcut.with_conv

    def separate(self, conv, x):  # every block calls its conv and its shortcut
        return None

    paths = {"separate": separate, "combined": combined}
    times: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for _ in range(3):
            step()
        for i in range(rounds):
            for k in list(paths) if i % 2 == 0 else list(paths)[::-1]:
                layers.PadShortcut.with_conv = paths[k]
                t0 = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t0)
    finally:
        layers.PadShortcut.with_conv = combined
    ratio = [a / b for a, b in zip(times["separate"], times["combined"], strict=True)]
    q1, med, q3 = statistics.quantiles(ratio, n=4)
    faster = sum(r > 1 for r in ratio)
    print(f"{model_name} training step at {size}x{size}, batch {batch}, {precision}: median ms "
          f"separate {1e3 * statistics.median(times['separate']):.1f}, combined "
          f"{1e3 * statistics.median(times['combined']):.1f}; separate / combined per round: "
          f"median x{med:.3f} (quartiles {q1:.3f}-{q3:.3f}), combined faster in {faster} of "
          f"{rounds}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--sizes", default="32")
    p.add_argument("--rounds", type=int, default=300, help="one timed step per path each")
    p.add_argument("--batch", type=int, default=128, help="the paper's CIFAR batch")
    args = p.parse_args()
    print(hardware())
    add_alone(args.batch)
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            steps(args.data, name, size, args.rounds, args.batch)


if __name__ == "__main__":
    main()
