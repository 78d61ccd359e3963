"""Eager vs torch.compile for reslab's training step, side by side in one process.

The two models train in alternating rounds on the same real CIFAR-10 batches (on-device loader,
the trainer's loss, optimizer and normalisation), so that a machine whose speed drifts over
minutes affects both alike. Prints the cold compile time, img/s per round and the median ratio.

    python benchmarks/bench_compile.py --data ../shared/data [--batch 256] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import hardware
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.engine.schedules import make_sgd
from reslab.models import create_model
from reslab.runtime.precision import autocast, resolve_precision


def make_step(compiled: bool, loader, args, precision: str):
    torch.manual_seed(0)
    model = create_model(args.model).to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    batches = (b for _ in range(1000) for b in loader)
    dev = torch.device("cpu")

    def step() -> None:
        x, y = next(batches)
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
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="steps per round and path")
    args = p.parse_args()
    # An empty inductor cache, so that the compile time printed is what a first run pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="reslab-bench-inductor-")
    print(hardware())
    train = load_cifar(args.data, split="train")
    pre = cifar_preprocess(args.normalization, train.images)
    loader = TensorLoader(train.images, train.labels, batch_size=args.batch, preprocess=pre,
                          train=True, channels_last=True)  # fmt: skip
    precision = resolve_precision("auto", torch.device("cpu"))
    steps = {name: make_step(name == "compiled", loader, args, precision)
             for name in ("eager", "compiled")}  # fmt: skip
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        print(f"{name}: first step {time.perf_counter() - t0:.1f} s")
        for _ in range(3):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
    for name, r in rates.items():
        print(f"{name:9s} img/s per round: {' '.join(f'{v:.0f}' for v in r)}")
    ratio = statistics.median(rates["compiled"]) / statistics.median(rates["eager"])
    print(f"{args.model}, batch {args.batch}, {precision}, {torch.get_num_threads()} threads: "
          f"compiled / eager = x{ratio:.2f} (medians)")  # fmt: skip


if __name__ == "__main__":
    main()
