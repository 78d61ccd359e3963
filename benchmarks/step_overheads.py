"""Where a CPU training step's time goes besides its kernels: fixed costs and thread scaling.

Three measurements of reslab's default CIFAR step (`common.cifar_default_step`, the trainer's
paths), printed with the hardware:

1. step time by batch size: what a step costs that does not grow with the batch (Python,
   autograd, dispatch, the optimizer) is about the time at the smallest batch;
2. the same step on 1 and on 2 threads, alternating: with T1 = s + p and T2 = s + p/2,
   s = 2*T2 - T1 is the work that two threads do not share (serial code, load imbalance, and
   memory bandwidth that one core already fills);
3. one oneDNN convolution call (forward, input gradient) on a 1x1 map: its fixed cost, which
   every conv call of a step pays whatever its size.

    PYTHONPATH=src python benchmarks/step_overheads.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import cifar_default_step, hardware, load_average


def _ms_per_step(step, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def by_batch(data: str, model: str, batches: list[int], steps: int, rounds: int) -> None:
    print(f"\n1. {model} step time by batch size (best of {rounds} rounds of {steps} steps)")
    for b in batches:
        _, _, step = cifar_default_step(data, model, batch=b)
        for _ in range(3):
            step()
        best = min(_ms_per_step(step, steps) for _ in range(rounds))
        print(f"   batch {b:4d}: {best:7.2f} ms/step  ({b / best * 1e3:7.0f} img/s)")


def thread_scaling(data: str, model: str, batch: int, steps: int, rounds: int) -> None:
    threads = torch.get_num_threads()
    if threads < 2:
        print(f"\n2. thread scaling: skipped (torch runs {threads} thread here)")
        return
    _, _, step = cifar_default_step(data, model, batch=batch)
    times: dict[int, list[float]] = {1: [], threads: []}
    for _ in range(3):
        step()
    for r in range(rounds):
        for nt in (1, threads) if r % 2 == 0 else (threads, 1):
            torch.set_num_threads(nt)
            step()
            times[nt].append(_ms_per_step(step, steps))
    torch.set_num_threads(threads)
    t1, tn = statistics.median(times[1]), statistics.median(times[threads])
    print(f"\n2. {model} batch {batch}, 1 vs {threads} threads (medians of {rounds} rounds)")
    print(f"   1 thread {t1:.1f} ms, {threads} threads {tn:.1f} ms: x{t1 / tn:.2f}")
    if threads == 2:
        s = 2 * tn - t1
        print(f"   not shared by the two threads: {s:.1f} ms of the {tn:.1f} ms step "
              f"({s / tn:.0%}); shared: {t1 - s:.1f} ms of work")  # fmt: skip


def conv_call_cost(reps: int = 2000) -> None:
    print("\n3. one oneDNN conv call on a 1x1 map, bf16 channels_last (fixed cost a call)")
    cl = torch.channels_last
    for c in (16, 64):
        x = torch.randn(1, c, 1, 1).to(torch.bfloat16).contiguous(memory_format=cl)
        w = (torch.randn(c, c, 3, 3) * 0.1).to(torch.bfloat16).contiguous(memory_format=cl)
        args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)

        def fwd(x=x, w=w, args=args):
            return torch.ops.aten.convolution(x, w, None, *args)

        def dgrad(x=x, w=w, args=args):
            mask = [True, False, False]
            return torch.ops.aten.convolution_backward(x, x, w, None, *args, mask)

        cost = {}
        for name, f in (("forward", fwd), ("input gradient", dgrad)):
            for _ in range(50):
                f()
            best = min(_ms_per_step(f, reps) for _ in range(3))
            cost[name] = best * 1e3
        print(f"   {c} channels: forward {cost['forward']:.1f} us, "
              f"input gradient {cost['input gradient']:.1f} us")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batches", default="2,16,32,128")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    print(hardware(), f"load average {load_average():.1f}")
    by_batch(a.data, a.model, [int(b) for b in a.batches.split(",")], a.steps, a.rounds)
    thread_scaling(a.data, a.model, 128, a.steps, a.rounds)
    conv_call_cost()


if __name__ == "__main__":
    main()
