"""Session 25's three changes to the fused kernel's training step, added one at a time.

1. Prefetching: the kernel's streaming loops ask for the data they read 2 KB ahead, and for the
   lines they write (kernels/bn_act.cpp: kPrefetchBytes, 0 turns both off;
   RESLAB_PREFETCH_WRITES=0 the writes' alone). At a CIFAR net's first stage one activation is 4 MB (batch 128, bf16), more
   than a core's L2, and the loops had run at about 10 GB/s from L3 with the hardware
   prefetchers alone.
2. The identity shortcut's input gradient: x feeds the shortcut and the block's first conv, and
   autograd summed the two gradients with torch's bf16 add, which ran at a third of a plain
   vector loop's speed on operands outside L2; `bn_act.fork_for_shortcut` hands the sum to the
   kernel's add (the same bits).
3. The running statistics and batch counter updated inside the kernel's forward (the same bits)
   instead of four small torch ops a layer, which cost ~70 us each in a step: the big loops just
   before them had evicted their code from cache.

Five paths, in alternating rounds of the same model and step (real CIFAR-10 batches through the
TensorLoader, as `reslab train` runs it): "session 24" (none of them), "+reads" (reads
prefetched), "+writes" (writes too: 1), "+sum" (1 and 2) and "+stats" (all three: the default). This VM's speed drifts by up to 1.4x within minutes,
so the per-round ratios are what count. Also times torch's bf16 add against the kernel's at the
three stage shapes, on operands outside L2 (8 pairs in turn).

    python benchmarks/ab_session25.py --data ../shared/data [--model resnet56] [--rounds 10]
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch

from common import ab_arguments, alternating_rounds, cifar_default_step, hardware, kernel_variant
from reslab.models import blocks, bn_act
from reslab.models.bn_act import kernel_status, load_kernel


def adds(ext) -> None:
    """torch's bf16 a + b against the kernel's, 8 operand pairs in turn (64 MB at stage 1: out
    of L2, as in a training step), best of 5 rounds of 48 adds."""
    for shape in [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]:
        g = torch.Generator().manual_seed(0)
        pairs = [tuple(torch.randn(shape, generator=g).bfloat16().contiguous(
            memory_format=torch.channels_last) for _ in range(2)) for _ in range(8)]  # fmt: skip
        best = {"torch": float("inf"), "kernel": float("inf")}
        for _ in range(5):
            for name, f in (("torch", torch.add), ("kernel", ext.add)):
                t0 = time.perf_counter()
                for _ in range(6):
                    for a, b in pairs:
                        f(a, b)
                best[name] = min(best[name], (time.perf_counter() - t0) / 48)
        mb = 3 * pairs[0][0].numel() * 2 / 1e6
        print(f"  {list(shape)} bf16 a + b: torch {best['torch'] * 1e3:.3f} ms "
              f"({mb / 1e3 / best['torch']:.1f} GB/s), kernel {best['kernel'] * 1e3:.3f} ms "
              f"({mb / 1e3 / best['kernel']:.1f} GB/s)")  # fmt: skip


def python_stats_function():
    """The fused op as session 24 called it: the kernel's forward, then the running statistics
    and counter updated by torch ops (lerp_, mul, add_), with today's backward."""

    class PythonStats(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, r, weight, bias, bn):  # type: ignore[override]
            if r is not None:
                r = r.contiguous(memory_format=torch.channels_last)
            y, mask, mean, var, rstd = bn_act.load_kernel().forward(
                x, r, weight, bias, bn.running_mean.detach(), bn.eps
            )
            m = x.numel() // x.shape[1]
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * (m / (m - 1)), bn.momentum)
            bn.num_batches_tracked.add_(1)
            ctx.save_for_backward(x, mask, mean, rstd, weight)
            ctx.with_residual = r is not None
            return y

        backward = bn_act._BNAct.backward

    return PythonStats


def main() -> None:
    args = ab_arguments().parse_args()
    print(hardware())
    new = load_kernel()
    if new is None:
        raise SystemExit(f"no kernel here: {kernel_status()}")
    print(f"kernel: {kernel_status()}")
    old = kernel_variant("_noprefetch", "RESLAB_PREFETCH_BYTES=0")
    reads = kernel_variant("_noprefetchw", "RESLAB_PREFETCH_WRITES=0")
    print("a + b alone:")
    adds(new)

    fork, fused, py_stats = blocks.fork_for_shortcut, bn_act._BNAct, python_stats_function()
    no_fork = lambda t: (t, t)  # noqa: E731
    paths = {  # (kernel build, fork function, autograd function)
        "session 24": (old, no_fork, py_stats),
        "+reads": (reads, no_fork, py_stats),
        "+writes": (new, no_fork, py_stats),
        "+sum": (new, fork, py_stats),
        "+stats": (new, fork, fused),
    }
    precision, _, step = cifar_default_step(args.data, args.model)

    def switch(k: str) -> Callable[[], None]:
        def to_k() -> None:
            bn_act._EXT, blocks.fork_for_shortcut, bn_act._BNAct = paths[k]

        return to_k

    try:
        rates = alternating_rounds({k: switch(k) for k in paths}, step, rounds=args.rounds,
                                   steps=args.steps)  # fmt: skip
    finally:
        bn_act._EXT, blocks.fork_for_shortcut, bn_act._BNAct = new, fork, fused
    print(f"\n{args.model} training step, batch 128, {precision}, {args.rounds} alternating rounds "
          f"of {args.steps} steps each (after 3 untimed)")  # fmt: skip
    for k, v in rates.items():
        print(f"{k:>10}: img/s per round " + " ".join(f"{a:.0f}" for a in v)
              + f"; median {statistics.median(v):.0f}")  # fmt: skip
    names = list(paths)
    for prev, k in itertools.pairwise(names):
        ratio = [b / a for a, b in zip(rates[prev], rates[k])]
        print(f"{k} / {prev}, per round: " + " ".join(f"{r:.3f}" for r in ratio)
              + f"; median x{statistics.median(ratio):.3f}")  # fmt: skip
    ratio = [b / a for a, b in zip(rates["session 24"], rates["+stats"])]
    print("all of them (+stats) / session 24, per round: " + " ".join(f"{r:.3f}" for r in ratio)
          + f"; median x{statistics.median(ratio):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
