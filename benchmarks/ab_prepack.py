"""Session 42: InferenceModel on the CPU in bf16 with each convolution's weight kept in oneDNN's
blocked layout per input shape (models/fused_eval.py's enable_packing: the fused op at any size)
against the session-41 path (the weight reordered on every call of the fused op, which only
inputs of 2^20 elements or more take; smaller ones run the eager ops).

Packed and unpacked fused calls give the same outputs to the bit (tests/test_inference.py);
below the size limit the eager ops round between ops, so logits differ within bf16 rounding.
This measures img/s of `reslab predict`'s runner per model, image size and batch, in
alternating rounds (order reversed every other round), median of each path's rounds, on random
BN-calibrated nets and random inputs (speed does not depend on the values), and the first
call at a new input shape, which packs the weights.

    python benchmarks/ab_prepack.py [--cases resnet20:32:1,resnet50:224:1] [--rounds 5]
"""

from __future__ import annotations

import statistics
import time

import torch

from ab_precast import calibrated, case_arguments, images_per_second
from common import load_average
from reslab.inference import InferenceModel
from reslab.models import fused_eval


def main() -> None:
    args = case_arguments(__doc__)
    print(f"{'model':10} {'side':>4} {'batch':>5} {'per call':>10} {'packed':>10}  ratio"
          "  first call (packs)")  # fmt: skip
    for case in args.cases.split(","):
        name, side, batch = case.split(":")
        runner = InferenceModel(calibrated(name), precision="bf16")
        x = torch.randn(int(batch), 3, int(side), int(side))
        rates: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            runner(x)  # (the unpacked path's first call: oneDNN's own primitive caches)
            fused_eval.PACK = True
            t0 = time.perf_counter()
            runner(x)
            first = time.perf_counter() - t0
            for i in range(args.rounds):
                for pack in (False, True) if i % 2 == 0 else (True, False):
                    fused_eval.PACK = pack
                    rates[pack].append(images_per_second(runner, x, args.seconds))
        fused_eval.PACK = True
        off, on = (statistics.median(rates[k]) for k in (False, True))
        print(f"{name:10} {side:>4} {batch:>5} {off:10.1f} {on:10.1f}  x{on / off:.2f}"
              f"  {first * 1e3:.0f} ms", flush=True)  # fmt: skip
    print(f"img/s, median of {args.rounds} alternating rounds of ~{args.seconds:g} s per path; "
          f"load average at end {load_average():.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
