"""The BN+ReLU kernel on torch's threads against the one-thread build sessions 15-19 shipped.

Until session 20 the kernel was compiled without -fopenmp, so ATen's header-only parallel_for in
it ran every loop on the calling thread: on a 2-core CPU the kernel used half the machine (its
forward took the same 0.8 ms at ResNet-20's first stage with 1 or 2 torch threads). Now it is
compiled with -fopenmp against the OpenMP runtime torch loaded (bn_act._openmp_library).

One model trains on real CIFAR-10 batches (the TensorLoader path `reslab train` uses) while the
kernel switches every round between the two builds of the same source; the convolutions and
everything else run on torch's threads in both. This VM's speed drifts by up to 1.4x within
minutes, so only the per-round ratio means anything. Also times each build's forward and
backward alone at the three CIFAR stage shapes. The one-thread build costs about 40 s to compile
the first time (cached after).

    python benchmarks/ab_threads.py --data ../shared/data [--rounds 10] [--model resnet20]
"""

from __future__ import annotations

import statistics

import torch

from common import ab_arguments, alternating_rounds, cifar_default_step, hardware, median_seconds
from reslab.models import bn_act
from reslab.models.bn_act import _kernel_name, kernel_status, load_kernel


def seconds(f, reps: int = 50) -> float:
    return median_seconds(f, reps, warmup=5)


def forward_backward(ext, x, r, dy, w, b, shift) -> tuple[float, float]:
    """Median seconds of one build's forward and of its backward (with the residual)."""
    _, mask, mean, _, rstd = ext.forward(x, r, w, b, shift, 1e-5)
    fwd = seconds(lambda: ext.forward(x, r, w, b, shift, 1e-5))
    bwd = seconds(lambda: ext.backward(dy, x, mask, mean, rstd, w, True))
    return fwd, bwd


def alone(builds: dict) -> None:
    """Each build's forward and backward (with a residual) at the CIFAR stages' shapes, bf16."""
    for shape in [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]:
        g = torch.Generator().manual_seed(0)
        x, r, dy = (torch.randn(shape, generator=g).bfloat16().contiguous(
            memory_format=torch.channels_last) for _ in range(3))  # fmt: skip
        c = shape[1]
        w, b, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), torch.zeros(c)
        line = []
        for k, ext in builds.items():
            fwd, bwd = forward_backward(ext, x, r, dy, w, b, shift)
            line.append(f"{k}: fwd {fwd * 1e3:.3f} ms, bwd {bwd * 1e3:.3f} ms")
        print(f"  {list(shape)} bf16 + residual: " + "; ".join(line))


def main() -> None:
    args = ab_arguments(steps=15).parse_args()
    print(hardware())
    new = load_kernel()
    if new is None or new.threads() < 2:
        raise SystemExit(f"the kernel does not run on several threads here: {kernel_status()}")
    old = bn_act._build(_kernel_name(None), march="native")  # no -fopenmp
    builds = {"1 thread (sessions 15-19)": old, f"{new.threads()} threads (OpenMP)": new}
    print(f"threads the kernel's loops run on: {', '.join(builds)}")
    print("each build alone (median of 50 calls):")
    alone(builds)

    precision, _, step = cifar_default_step(args.data, args.model)

    def switch(k: str):
        def to_k() -> None:
            bn_act._EXT = builds[k]

        return to_k

    try:
        rates = alternating_rounds({k: switch(k) for k in builds}, step, rounds=args.rounds,
                                   steps=args.steps)  # fmt: skip
    finally:
        bn_act._EXT = new
    print(f"\n{args.model} training step, batch 128, {precision}, {args.rounds} alternating rounds "
          f"of {args.steps} steps each (after 3 untimed)")  # fmt: skip
    for k, v in rates.items():
        print(f"{k}: img/s per round " + " ".join(f"{a:.0f}" for a in v)
              + f"; median {statistics.median(v):.0f}")  # fmt: skip
    ratio = [b / a for a, b in zip(*rates.values())]
    print("OpenMP / one thread, per round: " + " ".join(f"{r:.3f}" for r in ratio)
          + f"; median x{statistics.median(ratio):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
