"""Session 40: evaluation with BatchNorm folded, each convolution one oneDNN op with its bias,
ReLU and the block's shortcut add fused in (models/fused_eval.py), against the eager ops and
against session 39's AMX kernel for BasicBlocks (models/block_op.py's `infer`).

Paths (switched by the two module flags, in alternating rounds):
  eager:  every conv, ReLU and add its own op (oneDNN's conv with bias, then passes over memory)
  kernel: BasicBlocks through the AMX kernel wherever it applies, the rest eager (session 39's
          default)
  onednn:  every folded conv through oneDNN's fused op (stem, blocks, projections,
           bottlenecks; fp32 too) from fused_eval.MIN_ELEMENTS input elements on
  default: the kernel where it applies (bf16 BasicBlocks on AMX), oneDNN's op for the rest

Part 0 (--blocks): each kind of ResNet-20 block alone, eager / kernel / onednn.
Part 1, CIFAR: the whole test of a checkpoint as `reslab eval --views VIEWS` runs it
(reslab.engine.evaluator.evaluate, bf16), seconds and test error per path.
Part 2, ImageNet shapes: reslab.inference.InferenceModel (what `reslab predict` runs) on random
224x224 inputs, BN-calibrated random nets, img/s per path in bf16 and fp32, top-1 agreement of
each path with the eager fp32 one.

    python benchmarks/ab_fused_eval.py --data ../shared/data [--checkpoint RUN/last.pt ...]
        [--views flip-shift] [--rounds 5] [--models resnet18,resnet50] [--batch 32]
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
from reslab.inference import InferenceModel
from reslab.models import block_op, create_model, fused_eval
from reslab.models.bn_act import kernel_status, load_kernel

# (block_op.INFER, fused_eval.ENABLED)
PATHS = {"eager": (False, False), "kernel": (True, False), "onednn": (False, True),
         "default": (True, True)}  # fmt: skip


def use(path: str) -> None:
    block_op.INFER, fused_eval.ENABLED = PATHS[path]


def current() -> str:
    return next(p for p, f in PATHS.items() if f == (block_op.INFER, fused_eval.ENABLED))


def rounds(run, paths, n: int, label: str) -> dict[str, list[float]]:
    """Seconds of run() per path over n alternating rounds (order reversed every other round)."""
    for p in paths:  # warm-up: kernels load, oneDNN builds its primitives
        use(p)
        run()
    secs: dict[str, list[float]] = {p: [] for p in paths}
    for i in range(n):
        for p in paths if i % 2 == 0 else paths[::-1]:
            use(p)
            t0 = time.perf_counter()
            run()
            secs[p].append(time.perf_counter() - t0)
        print(f"{label} round {i}: " + ", ".join(f"{p} {secs[p][-1]:.3f} s" for p in paths),
              flush=True)  # fmt: skip
    return secs


def summary(label: str, secs: dict[str, list[float]], per: float, unit: str) -> None:
    base = secs["eager"]
    for p, s in secs.items():
        ratio = statistics.median(b / t for b, t in zip(base, s, strict=True))
        print(f"{label} {p:>7}: {statistics.median(s):.3f} s = {per / statistics.median(s):,.0f} "
              f"{unit}, x{ratio:.2f} eager (median of per-round ratios)")  # fmt: skip


def blocks(a: argparse.Namespace) -> None:
    """Each kind of block of a folded ResNet-20 alone (bf16, a chunk of FORWARD_CHUNK images):
    where the kernel is faster than oneDNN's fused convolutions, and where it is not."""
    net = fast_eval_model(create_model("resnet20"), torch.device("cpu"))
    n = evaluator.FORWARD_CHUNK
    cases = [("layer1[1] 16ch 32x32", net.layer1[1], 16, 32),
             ("layer2[0] 16->32ch stride 2", net.layer2[0], 16, 32),
             ("layer2[1] 32ch 16x16", net.layer2[1], 32, 16),
             ("layer3[0] 32->64ch stride 2", net.layer3[0], 32, 16),
             ("layer3[1] 64ch 8x8", net.layer3[1], 64, 8)]  # fmt: skip
    for label, block, c, h in cases:
        x = torch.randn(n, c, h, h).bfloat16().contiguous(memory_format=torch.channels_last)

        def run(block=block, x=x):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                for _ in range(20):
                    block(x)

        secs = rounds(run, ["eager", "kernel", "onednn"], a.rounds, label)
        summary(f"{label}, {n} images", secs, 20 * n, "img/s")


def cifar(a: argparse.Namespace, dev: torch.device) -> None:
    test = load_cifar(a.data, dataset="cifar10", split="test")
    for ckpt in a.checkpoint:
        loaded = load_checkpoint_model(ckpt, device=dev)
        model = fast_eval_model(loaded.model, dev)
        x, y = loaded.preprocess.normalize(test.images), test.labels
        batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(y), 500)]
        errors = {}

        def run(model=model, batches=batches, errors=errors):
            path = current()
            r = evaluator.evaluate(model, batches, device=dev, precision="bf16", views=a.views)
            errors[path] = r.top1_error

        secs = rounds(run, list(PATHS), a.rounds, ckpt)
        summary(f"{ckpt} ({a.views})", secs, len(y), "test images/s")
        print(f"{ckpt}: test error " + ", ".join(f"{p} {e:.2f}%" for p, e in errors.items()))


def imagenet(a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 224, 224)
    for name in a.models.split(","):
        net = create_model(name)
        with torch.no_grad():  # BN statistics of these inputs, so the folded net is not blown up
            net.train()
            for _ in range(2):
                net(torch.randn(8, 3, 224, 224))
        net.eval()
        for precision in ("bf16", "fp32"):
            model = InferenceModel(net, precision=precision)
            paths = ["eager", "onednn"] + (["kernel", "default"] if precision == "bf16" else [])
            out = {}

            def run(model=model, out=out):
                out[current()] = model(x).argmax(1)

            secs = rounds(run, paths, a.rounds, f"{name} {precision}")
            summary(f"{name} {precision} batch {a.batch}", secs, a.batch, "img/s")
            use("eager")
            ref = InferenceModel(net, precision="fp32")(x).argmax(1)
            print(f"{name} {precision}: top-1 agreement with eager fp32 " + ", ".join(
                f"{p} {(o == ref).float().mean().item():.3f}" for p, o in out.items()))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", nargs="*", default=[])
    p.add_argument("--views", default="flip-shift")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--blocks", action="store_true", help="first time ResNet-20's blocks alone")
    a = p.parse_args()
    load_kernel()
    print(f"# {hardware()}; load average {load_average():.2f}; torch {torch.__version__}")
    print(f"# {kernel_status()}; oneDNN fused conv available: {fused_eval.available()}")
    try:
        if a.blocks:
            blocks(a)
        cifar(a, torch.device("cpu"))
        if a.models:
            imagenet(a)
    finally:
        use("default")


if __name__ == "__main__":
    main()
