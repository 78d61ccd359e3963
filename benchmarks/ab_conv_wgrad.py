"""The AMX weight-gradient kernel (models/conv_wgrad.py) against oneDNN, alone and in a step.

1. Alone: the weight gradient of a 3x3 convolution (stride 1 and 2), bf16 channels_last, at a
   CIFAR ResNet's shapes (32 and 24 px batches: progressive resizing trains at 24)
   and at ImageNet ResNet-18/34 shapes: oneDNN's direct call, oneDNN over tiled images where
   the tiling rule takes the shape (models/tiled_wgrad.py), and the kernel; medians of 30
   calls after 3, on operands that stay in L3 (a step's come from farther: see 2).
2. In the default training step (real CIFAR-10 batches through the TensorLoader, as `reslab
   train` runs it), in alternating rounds: "oneDNN" (tiled or direct, session 25's step) and
   "kernel" (the default). This VM's speed drifts within minutes, so the per-round ratios are
   what count.

    python benchmarks/ab_conv_wgrad.py --data ../shared/data [--model resnet56] [--rounds 10]
        [--skip-shapes | --no-step]
"""

from __future__ import annotations

import torch

from common import (
    ab_arguments,
    alternating_rounds,
    amx_kernel,
    cifar_default_step,
    hardware,
    median_seconds,
    print_rounds,
)
from reslab.models import conv_wgrad, tiled_wgrad
from reslab.models.bn_act import kernel_status

_SHAPES = [  # (batch, in channels, out channels, input side, stride)
    (128, 16, 16, 32, 1), (128, 32, 32, 16, 1), (128, 64, 64, 8, 1), (128, 16, 32, 16, 1),
    (128, 16, 32, 32, 2), (128, 32, 64, 16, 2),
    (128, 16, 16, 24, 1), (128, 32, 32, 12, 1), (128, 64, 64, 6, 1),
    (128, 16, 32, 24, 2), (128, 32, 64, 12, 2),
    (32, 64, 64, 56, 1), (32, 128, 128, 28, 1), (32, 64, 128, 56, 2), (32, 256, 256, 14, 1),
]  # fmt: skip


def one_shape(ext, n: int, ci: int, co: int, side: int, stride: int) -> str:
    """One line: each path's median time and GFLOP/s at one shape, and the kernel's ratio."""
    back = torch.ops.aten.convolution_backward
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    out = side // stride
    x = torch.randn(n, ci, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
    dy = torch.randn(n, co, out, out, generator=g).bfloat16().contiguous(memory_format=cl)
    w = torch.zeros(co, ci, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=cl)
    args, mask = conv_wgrad.conv_args(stride), [False, True, False]
    times = {"oneDNN": median_seconds(lambda: back(dy, x, w, None, *args, mask))}
    conv = torch.nn.Conv2d(ci, co, 3, stride=stride, padding=1, bias=False)
    t = tiled_wgrad.tile_factor(conv, x)
    if t:
        tile = tiled_wgrad.tile_images
        times[f"tiled t={t}"] = median_seconds(
            lambda: back(tile(dy, t), tile(x, t), w, None, *args, mask)
        )
    times["kernel"] = median_seconds(lambda: ext.conv3x3_wgrad(x, dy, stride))
    flops = 2 * n * out * out * ci * co * 9
    onednn = min(v for k, v in times.items() if k != "kernel")
    each = ", ".join(
        f"{k} {v * 1e3:.3f} ms ({flops / v / 1e9:.0f} GFLOP/s)" for k, v in times.items()
    )
    shape = f"{n}x{ci}->{co} on {side}x{side}" + (" stride 2" if stride == 2 else "")
    return f"  {shape}: {each}; kernel x{onednn / times['kernel']:.2f}"


def main() -> None:
    p = ab_arguments()
    p.add_argument("--no-step", action="store_true", help="only the weight gradients alone")
    p.add_argument("--skip-shapes", action="store_true", help="only the training step")
    args = p.parse_args()
    print(hardware())
    ext = amx_kernel()
    print(f"kernel: {kernel_status()}; wgrad: {tiled_wgrad.status('bf16')}")
    if not args.skip_shapes:
        print("weight gradients alone (bf16, channels_last):")
        for shape in _SHAPES:
            print(one_shape(ext, *shape))
    if args.no_step:
        return
    usable = conv_wgrad.usable
    paths = {"oneDNN": lambda: setattr(conv_wgrad, "usable", lambda *a: False),
             "kernel": lambda: setattr(conv_wgrad, "usable", usable)}  # fmt: skip
    precision, _, step = cifar_default_step(args.data, args.model)
    try:
        rates = alternating_rounds(paths, step, rounds=args.rounds, steps=args.steps)
    finally:
        conv_wgrad.usable = usable
    print_rounds(args.model, precision, args.rounds, args.steps, rates, "oneDNN", "kernel")


if __name__ == "__main__":
    main()
