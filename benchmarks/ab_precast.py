"""Session 41: InferenceModel on the CPU in bf16 with its conv and linear weights stored in bf16
once (reslab.inference.precast) against autocast casting the fp32 weights on every call.

Both paths give the same logits to the bit (tests/test_inference.py); this measures img/s of
`reslab predict`'s runner per model, image size and batch, in alternating rounds (order reversed
every other round), median of each path's rounds, on random BN-calibrated nets and random
inputs (speed does not depend on the values).

    python benchmarks/ab_precast.py [--cases resnet20:32:1,resnet20:32:8,resnet18:224:1]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import hardware, load_average
from reslab import inference
from reslab.inference import InferenceModel
from reslab.models import create_model

DEFAULT_CASES = ("resnet20:32:1,resnet20:32:8,resnet20:32:64,resnet56:32:1,resnet18:224:1,"
                 "resnet18:224:8,resnet50:224:1,resnet50:224:8")  # fmt: skip


def images_per_second(runner: InferenceModel, x: torch.Tensor, seconds: float) -> float:
    """img/s of runner(x) over calls filling about `seconds` (after one warm-up call)."""
    runner(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        runner(x)
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def case_arguments(doc: str) -> argparse.Namespace:
    """--cases model:side:batch,..., --rounds, --seconds (this and ab_prepack.py); prints the
    hardware and the load average first."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="model:side:batch,...")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0, help="per path per round")
    args = p.parse_args()
    print(hardware())
    print(f"torch {torch.__version__}, load average at start {load_average():.2f}")
    return args


def calibrated(name: str) -> torch.nn.Module:
    """An eval-mode `name` with random BatchNorm statistics (so that folding is not trivial)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def main() -> None:
    args = case_arguments(__doc__)
    print(f"{'model':10} {'side':>4} {'batch':>5} {'per call':>10} {'cast once':>10}  ratio")
    for case in args.cases.split(","):
        name, side, batch = case.split(":")
        model = calibrated(name)
        runners = {}
        for precast in (False, True):
            inference.PRECAST = precast
            runners[precast] = InferenceModel(model, precision="bf16")
        inference.PRECAST = True
        x = torch.randn(int(batch), 3, int(side), int(side))
        rates: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            for i in range(args.rounds):
                for precast in (False, True) if i % 2 == 0 else (True, False):
                    rates[precast].append(images_per_second(runners[precast], x, args.seconds))
        off, on = (statistics.median(rates[k]) for k in (False, True))
        print(f"{name:10} {side:>4} {batch:>5} {off:10.1f} {on:10.1f}  x{on / off:.2f}", flush=True)
    print(f"img/s, median of {args.rounds} alternating rounds of ~{args.seconds:g} s per path; "
          f"load average at end {load_average():.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
