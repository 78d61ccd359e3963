"""Session 37's change to the blocks' convolutions: a stage's first block (stride 2) takes its
conv1's output and input gradient from kernels/conv_fwd.cpp instead of oneDNN's, each against
the build before it:

  session 36:   oneDNN's stride-2 output and input gradient (RESLAB_BLOCK_S2_FORWARD=0,
                RESLAB_BLOCK_S2_INPUT_GRAD=0);
  +input grad:  the input gradient as four phases over the output gradient (the even and odd
                rows and columns of x's gradient, each a stride-1 product of 1, 2 or 4 taps);
  +forward:     the output over x's odd and even rows in two buffers.
All three compute a block's forward and backward from the same kernels otherwise (and the
per-op path the same as the default build). First each call alone at a CIFAR net's two
transitions, batch 128, oneDNN's against the kernel's; then medians of per-round ratios over
alternating rounds of the default training step (real CIFAR-10 batches through the
TensorLoader, as `reslab train` runs it), switching the kernels the block ops call.

    python benchmarks/ab_session37.py --data ../shared/data [--model resnet56] [--skip-alone]
        [--builds "+input grad,+forward"]
"""

from __future__ import annotations

import itertools

import torch

from common import (
    ab_arguments,
    amx_kernel,
    cifar_default_step,
    hardware,
    kernel_rounds,
    kernel_variant,
    median_seconds,
    print_ratios,
)
from reslab.models import conv_wgrad
from reslab.models.bn_act import kernel_status

BUILDS = {
    "session 36": ("RESLAB_BLOCK_S2_FORWARD=0", "RESLAB_BLOCK_S2_INPUT_GRAD=0"),
    "+input grad": ("RESLAB_BLOCK_S2_FORWARD=0",),
    "+forward": (),
}


def alone(ext) -> None:
    """ms of one call at batch 128, best of 3 medians: oneDNN's and the kernel's; the operands
    are fresh each call's size (x 2-4 MiB), as in a step, where they come from memory."""
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    back = torch.ops.aten.convolution_backward
    args = conv_wgrad.conv_args(2)
    print("one stride-2 convolution, batch 128 (ms: oneDNN / kernel; TFLOP/s of the kernel):")
    for c, side in ((16, 32), (32, 16)):
        x = torch.randn(128, c, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
        w = torch.randn(2 * c, c, 3, 3, generator=g).mul(0.1).bfloat16()
        w = w.contiguous(memory_format=cl)
        dy = torch.randn(128, 2 * c, side // 2, side // 2, generator=g).bfloat16()
        dy = dy.contiguous(memory_format=cl)
        calls = {
            "forward": (
                lambda x=x, w=w: torch.ops.aten.convolution(x, w, None, *args),
                lambda x=x, w=w: ext.conv3x3_forward(x, w, stride=2),
            ),
            "input gradient": (
                lambda x=x, w=w, dy=dy: back(dy, x, w, None, *args, [True, False, False]),
                lambda w=w, dy=dy: ext.conv3x3_forward(dy, w, transposed=True, stride=2),
            ),
        }
        flop = 2 * 128 * (side // 2) ** 2 * 2 * c * c * 9
        for name, (onednn, kernel) in calls.items():
            best = [float("inf"), float("inf")]
            for _ in range(3):
                best = [min(b, median_seconds(f)) for b, f in zip(best, (onednn, kernel))]
            print(f"  {c} -> {2 * c} channels on {side}x{side}, {name}: {best[0] * 1e3:.3f} / "
                  f"{best[1] * 1e3:.3f} (x{best[0] / best[1]:.2f}; {flop / best[1] / 1e12:.2f})")  # fmt: skip


def main() -> None:
    p = ab_arguments(rounds=10, steps=20)
    p.add_argument("--skip-alone", action="store_true", help="only the training step")
    p.add_argument("--builds", default=",".join(BUILDS),
                   help="the builds to alternate, comma-separated (default: all three)")  # fmt: skip
    args = p.parse_args()
    names = args.builds.split(",")
    if len(names) < 2 or any(n not in BUILDS for n in names):
        raise SystemExit(f"--builds: two or more of {', '.join(BUILDS)}")
    print(hardware())
    ext = amx_kernel()
    print(f"kernel: {kernel_status()}")
    if not args.skip_alone:
        alone(ext)
    kernels = {k: (kernel_variant("_s37" + str(i), *d) if d else ext)
               for i, (k, d) in enumerate(BUILDS.items()) if k in names}  # fmt: skip

    precision, _, step = cifar_default_step(args.data, args.model)
    rates = kernel_rounds(kernels, step, rounds=args.rounds, steps=args.steps)
    print_ratios(
        args.model,
        precision,
        args.rounds,
        args.steps,
        rates,
        [*itertools.pairwise(names), *([(names[0], names[-1])] if len(names) > 2 else [])],
    )


if __name__ == "__main__":
    main()
