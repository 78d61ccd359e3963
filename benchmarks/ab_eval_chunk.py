"""Session 43: CPU evaluation in passes of at most evaluator.FORWARD_ELEMENTS input elements
(at 224px, 111 images a pass) against the earlier fixed FORWARD_CHUNK of 256 images a pass.

At 256 224px images a ResNet's stem output is 411 MB in bf16, over glibc's mmap threshold as
reslab sets it (runtime/memory.py: 256 MiB), so a pass page-faults its largest activations in
afresh. This times what `reslab eval` and a run's evaluations call (evaluator.view_probs on the
model fast_eval_model builds, bf16 autocast, tune_malloc as run_eval sets it) and
InferenceModel (`reslab predict`'s runner), per case, in alternating rounds (order reversed
every other round), median of each path's rounds, on random BN-calibrated nets and random
inputs (speed does not depend on the values). A case is model:side:batch[:views]; views 10 is
ten-crop's [batch, 10, 3, side, side], 1 a plain batch; "infer" cases time InferenceModel.

    python benchmarks/ab_eval_chunk.py [--cases resnet50:224:32:10,...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from ab_precast import calibrated
from common import hardware, load_average
from reslab.engine import evaluator
from reslab.engine.eval_run import fast_eval_model
from reslab.inference import InferenceModel
from reslab.runtime.memory import tune_malloc

DEFAULT_CASES = ("resnet50:224:32:10,resnet50:224:256:1,resnet18:224:32:10,"
                 "resnet18:224:256:1,resnet20:32:500:6,infer:resnet50:224:256")  # fmt: skip


def run_case(case: str, rounds: int, seconds: float) -> tuple[float, float]:
    """Median img/s (views counted) with 256 images a pass and with FORWARD_ELEMENTS."""
    parts = case.split(":")
    infer = parts[0] == "infer"
    name, side, batch, *rest = parts[1:] if infer else parts
    views = int(rest[0]) if rest and not infer else 1
    image = (3, int(side), int(side))
    x = torch.randn(int(batch), views, *image) if views > 1 else torch.randn(int(batch), *image)
    if infer:
        runner = InferenceModel(calibrated(name), precision="bf16")

        def call() -> None:
            runner(x)
    else:
        model = fast_eval_model(calibrated(name), torch.device("cpu"), "bf16")

        def call() -> None:
            with torch.inference_mode():
                evaluator.view_probs(model, x, num_classes=None, precision="bf16")

    def rate(elements: int) -> float:
        evaluator.FORWARD_ELEMENTS = elements
        call()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            call()
            n += 1
        return n * int(batch) * views / (time.perf_counter() - t0)

    limit = evaluator.FORWARD_ELEMENTS
    rates: dict[int, list[float]] = {1 << 62: [], limit: []}
    try:
        for i in range(rounds):
            for elements in list(rates) if i % 2 == 0 else list(rates)[::-1]:
                rates[elements].append(rate(elements))
    finally:
        evaluator.FORWARD_ELEMENTS = limit
    old, new = (statistics.median(r) for r in rates.values())
    return old, new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="per path per round")
    args = p.parse_args()
    print(hardware())
    print(f"torch {torch.__version__}, tune_malloc {tune_malloc()}, "
          f"load average at start {load_average():.2f}")  # fmt: skip
    print(f"{'case':26} {'256 a pass':>11} {'by elements':>12}  ratio  (img/s, views counted)")
    for case in args.cases.split(","):
        old, new = run_case(case, args.rounds, args.seconds)
        print(f"{case:26} {old:11.1f} {new:12.1f}  x{new / old:.2f}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"median of {args.rounds} alternating rounds of ~{args.seconds:g} s per path; "
          f"load average at end {load_average():.2f}; peak RSS {rss} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
