"""Session 39's change to evaluation: an eval-mode BasicBlock with its BatchNorms folded (the
model `reslab eval` and a run's evaluations build) as two calls of the AMX convolution kernel
with bias, shortcut add and ReLU applied as each output is written (models/block_op.py's
`infer`), against its eager ops (oneDNN's convolution with bias, then ReLU, the shortcut's add
and ReLU as separate passes over memory).

The whole test of a checkpoint as `reslab eval --views VIEWS` runs it (the test set normalised
once, reslab.engine.evaluator.evaluate in chunks of FORWARD_CHUNK images), each path in turn
over alternating rounds; medians of the seconds and of the per-round ratios, each path's test
error. Without a checkpoint a freshly initialised net
is timed (the errors are then meaningless).

    python benchmarks/ab_session39.py --data ../shared/data [--checkpoint RUN/last.pt]
        [--model resnet20] [--views flip-shift] [--rounds 5] [--chunks 128,256,512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import hardware, load_average
from reslab.data.cifar import load_cifar
from reslab.engine import evaluator
from reslab.engine.eval_run import fast_eval_model, load_checkpoint_model
from reslab.models import block_op, create_model
from reslab.models.bn_act import kernel_status, load_kernel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--model", default="resnet20", help="without --checkpoint")
    p.add_argument("--views", default="flip-shift")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunks", default=str(evaluator.FORWARD_CHUNK),
                   help="images per forward pass, comma-separated (each timed on both paths)")  # fmt: skip
    a = p.parse_args()
    dev = torch.device("cpu")
    if a.checkpoint:
        loaded = load_checkpoint_model(a.checkpoint, device=dev)
        net, pre, name = loaded.model, loaded.preprocess, a.checkpoint
    else:
        from reslab.data.preprocess import Preprocess

        net, pre, name = create_model(a.model), Preprocess(), f"{a.model} (untrained)"
    model = fast_eval_model(net, dev)
    test = load_cifar(a.data, dataset="cifar10", split="test")
    x, y = pre.normalize(test.images), test.labels
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(y), 500)]
    load_kernel()
    print(f"# {hardware()}; load average {load_average():.2f}")
    print(f"# {kernel_status()}; {name}, {len(y)} test images, views {a.views}")

    def run(infer: bool, chunk: int):
        block_op.INFER, evaluator.FORWARD_CHUNK = infer, chunk
        t0 = time.perf_counter()
        r = evaluator.evaluate(model, batches, device=dev, precision="bf16", views=a.views)
        return time.perf_counter() - t0, r

    default_chunk = evaluator.FORWARD_CHUNK
    try:
        for chunk in (int(c) for c in a.chunks.split(",")):
            run(True, chunk), run(False, chunk)  # warm-up (kernel loads, oneDNN's primitives)
            secs = {True: [], False: []}
            ratios, result = [], {}
            for i in range(a.rounds):
                for infer in (True, False) if i % 2 == 0 else (False, True):
                    dt, result[infer] = run(infer, chunk)
                    secs[infer].append(dt)
                ratios.append(secs[False][-1] / secs[True][-1])
                print(f"chunk {chunk} round {i}: kernel {secs[True][-1]:.2f} s, "
                      f"eager {secs[False][-1]:.2f} s", flush=True)  # fmt: skip
            k, e = result[True], result[False]
            print(
                f"chunk {chunk}: kernel {statistics.median(secs[True]):.2f} s, eager "
                f"{statistics.median(secs[False]):.2f} s (medians of {a.rounds}); "
                f"x{statistics.median(ratios):.3f} (median of per-round ratios); test error "
                f"kernel {k.top1_error:.2f}%, eager {e.top1_error:.2f}%"
            )
    finally:
        block_op.INFER, evaluator.FORWARD_CHUNK = True, default_chunk


if __name__ == "__main__":
    main()
