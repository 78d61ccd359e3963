"""Tiled weight gradients (models/tiled_wgrad.py) against oneDNN's direct ones, in one process.

First each shape alone: the bf16 channels_last weight gradient of a 3x3 convolution as oneDNN
computes it, against the same over tile_images(.., t) (the tiling copies included), for the
CIFAR stages at 32 and 24 px and ResNet-18's layer3/layer4 at 224 px, each t in --tiles; then
a training step of reslab's default CPU path on real CIFAR-10 batches with the blocks'
`tiled_wgrad` flag on and off in alternating rounds, at each size in --sizes (24 is what
progressive resizing trains most iterations at). This VM's speed drifts by up to 2x within
seconds, so only per-round ratios mean anything; medians over rounds are printed. A round is one
timed step per path by default (after 2 untimed ones), in 150 rounds: session 21's rounds of 4
steps (20 rounds) spread from x0.74 to x1.59 and could not tell a 2% gain from none; one-step
rounds put it at x1.015-1.084 (results/cpu-kind/intel-amx-20261201/session22).

On a CPU without AMX, tiling is off by default (not measured there); --force turns the CPU
check off so that this script measures whether it would pay there.

    python benchmarks/ab_tiled_wgrad.py --data ../shared/data [--models resnet20,resnet56]
        [--sizes 32,24] [--batch 256] [--rounds 150] [--steps 1] [--force]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import cifar_default_step, hardware
from reslab.models import tiled_wgrad
from reslab.models.tiled_wgrad import tile_images, use_tiled_wgrad

_ARGS = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
# (C, H): CIFAR stages at 32 and at 24 px (at --batch), then (N, C, H): ResNet-18/34 layer3 and
# layer4 at 224 px (batch 32, the fine-tuning recipe's).
CIFAR_SHAPES = [(16, 32), (32, 16), (64, 8), (16, 24), (32, 12), (64, 6)]
IMAGENET_SHAPES = [(32, 256, 14), (32, 512, 7)]


def per_round(fs: dict, rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one list entry per round; order alternates."""
    out: dict[str, list[float]] = {k: [] for k in fs}
    for i in range(rounds):
        for k in list(fs) if i % 2 == 0 else list(fs)[::-1]:
            for _ in range(2):
                fs[k]()
            t0 = time.perf_counter()
            for _ in range(reps):
                fs[k]()
            out[k].append((time.perf_counter() - t0) / reps)
    return out


def wgrad_paths(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, tiles: list[int]) -> dict:
    """The direct weight gradient and one tiled one per t, as functions of no arguments."""
    back = torch.ops.aten.convolution_backward
    fs = {"direct": lambda: back(dy, x, w, None, *_ARGS, [False, True, False])}
    for t in tiles:
        fs[f"t={t}"] = lambda t=t: back(tile_images(dy, t), tile_images(x, t), w, None,
                                        *_ARGS, [False, True, False])  # fmt: skip
    return fs


def shapes_alone(tiles: list[int], rounds: int, batch: int) -> None:
    print(f"weight gradient alone, bf16 channels_last, medians of {rounds} alternating rounds:")
    for n, c, h in [(batch, c, h) for c, h in CIFAR_SHAPES] + IMAGENET_SHAPES:
        g = torch.Generator().manual_seed(0)
        x, dy = (torch.randn(n, c, h, h, generator=g).bfloat16().contiguous(
            memory_format=torch.channels_last) for _ in range(2))  # fmt: skip
        w = torch.randn(c, c, 3, 3, generator=g).bfloat16()
        fs = wgrad_paths(x, dy, w.contiguous(memory_format=torch.channels_last), tiles)
        times = per_round(fs, rounds, reps=max(2, int(4e8 / (n * c * c * h * h * 9))))
        base = times["direct"]
        flops = 2 * n * h * h * c * c * 9
        cells = [f"direct {statistics.median(base) * 1e3:6.2f} ms "
                 f"({flops / statistics.median(base) / 1e9:4.0f} GFLOP/s)"]  # fmt: skip
        for t in tiles:
            r = [b / a for b, a in zip(base, times[f"t={t}"])]
            cells.append(f"t={t} x{statistics.median(r):.2f}")
        print(f"  N={n:3d} {c:3d}->{c:3d} on {h:2d}x{h:2d}: " + ", ".join(cells), flush=True)


def steps(data: str, model_name: str, size: int, rounds: int, n_steps: int, batch: int) -> None:
    precision, model, step = cifar_default_step(data, model_name, batch=batch, size=size)
    fs = {}
    for on in (False, True):
        fs["tiled" if on else "direct"] = lambda on=on: (use_tiled_wgrad(model, on), step())
    times = per_round(fs, rounds, n_steps)
    rate = {k: [batch / s for s in v] for k, v in times.items()}
    ratio = [b / a for a, b in zip(rate["direct"], rate["tiled"])]
    print(f"{model_name} training step at {size}x{size}, batch {batch}, {precision}: "
          f"img/s median direct {statistics.median(rate['direct']):.0f}, tiled "
          f"{statistics.median(rate['tiled']):.0f}; tiled / direct per round "
          + " ".join(f"{r:.3f}" for r in ratio) + f"; median x{statistics.median(ratio):.3f}",
          flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--sizes", default="32,24")
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--steps", type=int, default=1, help="timed steps per round and path")
    p.add_argument("--batch", type=int, default=256, help="the cifar10-fast recipes' batch")
    p.add_argument("--tiles", default="2,4", help="canvas sides t to time per shape")
    p.add_argument("--force", action="store_true", help="tile on a CPU without AMX too")
    p.add_argument("--skip-shapes", action="store_true")
    args = p.parse_args()
    print(hardware())
    amx = tiled_wgrad._amx()
    print(f"AMX: {'yes' if amx else 'no'}; tiling by default: {'on' if amx else 'off'}")
    if args.force:
        tiled_wgrad._amx = lambda: True
    elif not amx:
        print("(the step comparison below is direct vs direct; pass --force to tile here)")
    if not args.skip_shapes:
        shapes_alone([int(t) for t in args.tiles.split(",")], min(args.rounds, 8), args.batch)
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            steps(args.data, name, size, args.rounds, args.steps, args.batch)


if __name__ == "__main__":
    main()
