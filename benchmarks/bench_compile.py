"""Eager vs torch.compile for reslab's training step, side by side in one process.

The models train in alternating rounds on real CIFAR-10 batches (on-device loader, the
trainer's loss, optimizer and normalisation), so that a machine whose speed drifts over minutes
affects every path alike. Prints the cold compile time, img/s per round and the median ratio.

With `--sizes 24 32` each path steps through the sizes in that order, as a progressive-resizing
run does (`small_size`: [B, 3, 24, 24] batches first, then [B, 3, 32, 32]). The compiled path
is what `reslab train --compile` builds (`torch.compile(model)`, dynamic=None: the second shape
it sees makes dynamo recompile with symbolic sizes); `--static` adds `dynamic=False`, one
specialised graph per shape, to show what that default costs or saves. Its first steps reuse
kernels the compiled path already built in this process, so only the first path's are cold.

    python benchmarks/bench_compile.py --data ../shared/data [--model resnet56] [--sizes 24 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import hardware, load_average
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.engine.schedules import make_sgd
from reslab.models import create_model
from reslab.runtime.precision import autocast, resolve_precision


def make_step(model_name: str, compile_kw: dict | None, label_smoothing: float, precision: str):
    """One training step of a fresh model (same seed for every path); compile_kw None: eager."""
    torch.manual_seed(0)
    model = create_model(model_name).to(memory_format=torch.channels_last)
    net = model if compile_kw is None else torch.compile(model, **compile_kw)
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    dev = torch.device("cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(precision, dev):
            loss = criterion(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=256, help="256: the cifar10-fast recipe")
    p.add_argument("--normalization", default="per_channel", choices=["per_channel", "per_pixel"])
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--sizes", type=int, nargs="+", default=[32],
                   help="input sides, in the order a run sees them (progressive: 24 32)")  # fmt: skip
    p.add_argument("--static", action="store_true",
                   help="also time torch.compile(dynamic=False)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="steps per round, size and path")
    args = p.parse_args()
    if any(not 8 <= s <= 32 for s in args.sizes):
        p.error(f"--sizes: each side must be in 8..32, got {args.sizes}")
    # An empty inductor cache, so that the compile time printed is what a first run pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="reslab-bench-inductor-")
    print(hardware())
    train = load_cifar(args.data, split="train")
    pre = cifar_preprocess(args.normalization, train.images)

    def batches(size: int):
        # small_iters beyond any step: every batch is downsampled to `size`, as small_size does
        ld = TensorLoader(train.images, train.labels, batch_size=args.batch, preprocess=pre,
                          train=True, channels_last=True, small_size=size if size < 32 else None,
                          small_iters=1 << 40)  # fmt: skip
        while True:
            yield from ld  # next epoch: a fresh order, as in training

    feed = {s: batches(s) for s in args.sizes}
    precision = resolve_precision("auto", torch.device("cpu"))
    variants: dict[str, dict | None] = {"eager": None, "compiled": {}}
    if args.static:
        variants["static"] = {"dynamic": False}
    steps = {name: make_step(args.model, kw, args.label_smoothing, precision)
             for name, kw in variants.items()}  # fmt: skip
    for name, step in steps.items():
        for s in args.sizes:  # the run's order: each new shape pays its (re)compile here
            t0 = time.perf_counter()
            step(*next(feed[s]))
            print(f"{name} {s}x{s}: first step {time.perf_counter() - t0:.1f} s", flush=True)
            for _ in range(3):
                step(*next(feed[s]))
    rates = {(n, s): [] for n in steps for s in args.sizes}
    for _ in range(args.rounds):
        for s in args.sizes:
            for name, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(*next(feed[s]))
                rates[name, s].append(args.batch * args.steps / (time.perf_counter() - t0))
    for (name, s), r in rates.items():
        print(f"{name:9s} {s}x{s} img/s per round: {' '.join(f'{v:.0f}' for v in r)}")
    for s in args.sizes:
        eager = statistics.median(rates["eager", s])
        for name in steps:
            if name != "eager":
                ratio = statistics.median(rates[name, s]) / eager
                print(f"{args.model}, {s}x{s}, batch {args.batch}, {precision}, "
                      f"{torch.get_num_threads()} threads: {name} / eager = x{ratio:.2f} "
                      f"(medians; eager {eager:.0f} img/s)")  # fmt: skip
    if args.static:
        print("static's first-step times reuse the compiled path's kernels: not a cold compile")
    print(f"load average {load_average():.2f}")


if __name__ == "__main__":
    main()
