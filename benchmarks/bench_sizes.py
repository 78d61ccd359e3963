"""Training throughput by input side: what progressive resizing (TrainConfig.small_size) buys.

reslab's default training step (channels_last, bf16 autocast where the CPU has it, nesterov SGD)
fed by the on-device TensorLoader with pad/crop/flip, at full size (32x32: the reference) and
with every batch downsampled to 28, 24 and 20 pixels as `small_size` does. Sizes are timed in
interleaved rounds so that drift of the machine's speed hits them all alike. Prints img/s, the
time per image relative to 32x32 (the pixel ratio is what one expects), the conv+fc TFLOP/s and
their fraction of the measured matmul peak (bf16's, or fp32's where the default trains in fp32).

    python benchmarks/bench_sizes.py --data ../shared/data [--model resnet20] [--rounds 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import hardware, load_average, matmul_peak, peak_dtype


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=256, help="256: cifar10-fast")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 28, 24, 20])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="steps per size per round")
    args = p.parse_args()

    from reslab.analysis.complexity import count_macs
    from reslab.data.cifar import load_cifar
    from reslab.data.loaders import TensorLoader
    from reslab.data.setup import cifar_preprocess
    from reslab.models import create_model
    from reslab.runtime.precision import autocast, resolve_precision

    torch.manual_seed(0)
    train = load_cifar(args.data, split="train")
    pre = cifar_preprocess("per_channel", train.images)
    dev = torch.device("cpu")
    precision = resolve_precision("auto", dev)
    net = create_model(args.model, num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)  # fmt: skip

    def loader(size: int) -> TensorLoader:
        # small_iters beyond any step: every batch of this loader is downsampled to `size`
        return TensorLoader(train.images, train.labels, batch_size=args.batch, preprocess=pre,
                            train=True, small_size=size if size < 32 else None,
                            small_iters=1 << 40)  # fmt: skip

    def forever(ld: TensorLoader):
        while True:
            yield from ld  # next epoch: a fresh order, as in training

    iters = {s: forever(loader(s)) for s in args.sizes}
    # forward + backward (2x forward) FLOPs per image, 2 per multiply-add (conv + fc)
    flops = {s: 3 * 2 * count_macs(net, s) for s in args.sizes}

    def steps(size: int, n: int) -> None:
        for _ in range(n):
            x, y = next(iters[size])
            with autocast(precision, dev):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for s in args.sizes:
        steps(s, 3)  # warm-up: oneDNN primitives for this shape
    rates: dict[int, list[float]] = {s: [] for s in args.sizes}
    for _ in range(args.rounds):
        for s in args.sizes:
            t0 = time.perf_counter()
            steps(s, args.steps)
            rates[s].append(args.steps * args.batch / (time.perf_counter() - t0))
    keep = max(1, args.rounds - 1)
    ips = {s: sum(sorted(v)[-keep:]) / keep for s, v in rates.items()}  # best rounds
    pdtype, peak_name = peak_dtype(precision)
    peak = matmul_peak(pdtype)
    ref = ips.get(32, ips[args.sizes[0]])
    print(f"{args.model}, batch {args.batch}, precision {precision}, channels_last, eager; "
          f"best {keep} of {args.rounds} rounds of {args.steps} steps")  # fmt: skip
    print(f"{'size':>5}{'img/s':>9}{'time/img vs 32':>16}{'pixels vs 32':>14}{'TFLOP/s':>9}"
          f"{f'of {peak_name} peak':>14}")  # fmt: skip
    for s in args.sizes:
        tf = ips[s] * flops[s]
        print(f"{s:>5}{ips[s]:>9.0f}{ref / ips[s]:>16.3f}{(s / 32) ** 2:>14.3f}"
              f"{tf / 1e12:>9.3f}{tf / peak:>14.1%}")  # fmt: skip
    print(f"measured {peak_name} matmul peak {peak / 1e12:.3f} TFLOP/s; load average "
          f"{load_average():.2f}")  # fmt: skip
    print(hardware())


if __name__ == "__main__":
    main()
