"""Session 35's changes to the default CPU training step, each against the step before it.

  session 34: stage transition blocks (stride 2, option A) per op, option A's shortcut made by
              torch's zero_/copy_ of channel slices, batches augmented by six tensor ops.
  +pad:       the shortcut from the kernels' subsample_pad (one pass; layers._pad_forward).
  +op:        the transition blocks as one autograd op too (block_op.TRANSITIONS).
  +data:      training batches from the kernels' crop_normalize (kernels/augment.cpp: the crop,
              mirror and normalisation in one pass; TensorLoader._augmented_by_kernel).
All four compute the same bits. Medians of per-round ratios over alternating rounds of the
default step (real CIFAR-10 batches through the TensorLoader, as `reslab train` runs it); the
batch alone first.

    python benchmarks/ab_session35.py --data ../shared/data [--model resnet56] [--size 24
        --batch 256]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from common import (
    ab_arguments,
    alternating_rounds,
    amx_kernel,
    cifar_default_step,
    hardware,
    median_seconds,
    print_ratios,
)
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.models import block_op, layers
from reslab.models.bn_act import kernel_status

_KERNEL_PAD = layers._pad_forward
_KERNEL_DATA = TensorLoader._augmented_by_kernel


def _torch_pad(x, stride, lo, hi, groups):
    """Session 34's layers._pad_forward: zero_ and copy_ of the channel slices."""
    n, kc = x.shape[:2]
    c = kc // groups
    sub = x[:, :, ::stride, ::stride]
    h, w = sub.shape[2:]
    out = torch.empty((n, groups * (lo + c + hi), h, w), dtype=x.dtype, device=x.device,
                      memory_format=layers._memory_format(x))  # fmt: skip
    grouped = out.view(n, groups, lo + c + hi, h, w)
    grouped[:, :, :lo].zero_()
    grouped[:, :, lo + c :].zero_()
    grouped[:, :, lo : lo + c].copy_(sub.view(n, groups, c, h, w))
    return out


def _set(pad: bool, op: bool, data: bool) -> None:
    layers._pad_forward = _KERNEL_PAD if pad else _torch_pad
    block_op.TRANSITIONS = op
    TensorLoader._augmented_by_kernel = _KERNEL_DATA if data else (lambda self, idx, step: None)


PATHS = {
    "session 34": (False, False, False),
    "+pad": (True, False, False),
    "+op": (True, True, False),
    "+data": (True, True, True),
}


def batch_alone(data: str, batch: int) -> None:
    """One training batch of the TensorLoader, tensor ops vs the kernel: ms, median of 200."""
    train = load_cifar(data, split="train")
    pre = cifar_preprocess("per_pixel", train.images)
    times: dict[bool, list[float]] = {}
    for on in (False, True, False, True):
        _set(True, True, on)
        loader = TensorLoader(train.images, train.labels, batch_size=batch, preprocess=pre,
                              train=True, channels_last=True)  # fmt: skip
        it = (b for _ in range(1000) for b in loader)
        times.setdefault(on, []).append(median_seconds(lambda it=it: next(it), reps=200, warmup=20))
    ops, kernel = min(times[False]), min(times[True])
    print(f"one training batch of {batch}: tensor ops {ops * 1e3:.3f} ms, kernel "
          f"{kernel * 1e3:.3f} ms (x{ops / kernel:.2f})")  # fmt: skip


def main() -> None:
    p = ab_arguments(rounds=10, steps=20)
    p.add_argument("--size", type=int, default=32, help="image side (24: progressive resizing)")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    print(hardware())
    amx_kernel()
    print(f"kernel: {kernel_status()}")
    try:
        batch_alone(args.data, args.batch)

        def switch(k: str) -> Callable[[], None]:
            return lambda: _set(*PATHS[k])

        precision, _, step = cifar_default_step(args.data, args.model, batch=args.batch,
                                                size=args.size)  # fmt: skip
        rates = alternating_rounds({k: switch(k) for k in PATHS}, step, rounds=args.rounds,
                                   steps=args.steps, batch=args.batch)  # fmt: skip
    finally:
        _set(True, True, True)
    print(f"\nimages {args.size}x{args.size}")
    print_ratios(
        args.model,
        precision,
        args.rounds,
        args.steps,
        rates,
        [*itertools.pairwise(PATHS), ("session 34", "+data")],
        batch=args.batch,
    )


if __name__ == "__main__":
    main()
