"""K seeds fused into one grouped net against the same K nets trained one after another.

Same iterations, same batches (real CIFAR-10 through the TensorLoader, one seed per member,
made before timing so that only the training step is timed), same optimizers (one SGD per
member, as the fused trainer keeps them). For each model and K it prints the training img/s per
member both ways, the speed-up (sequential time / fused time) and, for the GPU goal, the fused
time for K seeds over the time of one seed. Fused and sequential alternate in `--repeats`
blocks and the median block counts, so a load change on a shared machine hits both alike.
CPU: wall clock; GPU (--device cuda): CUDA events after warm-up.

    python benchmarks/bench_fused.py --data ../shared/data [--models resnet20,resnet56]
        [--ks 2,5] [--steps 10] [--device cuda] [--json out.json] [--conv]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from common import hardware, load_average
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.engine.fused_trainer import member_losses
from reslab.engine.schedules import make_sgd
from reslab.models import create_model
from reslab.models.fused import FusedCifarNet, stack_inputs
from reslab.runtime.precision import autocast, resolve_precision


def member_batches(args: argparse.Namespace, dev: torch.device, k: int, n: int) -> list[list]:
    """n training batches for each of k members (own seed: own order and augmentation)."""
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (4096,), generator=g)
    else:
        split = load_cifar(args.data, split="train45k")
        images, labels = split.images, split.labels
    pre = cifar_preprocess("per_pixel", images)
    out = []
    for seed in range(k):
        loader = TensorLoader(images.to(dev), labels.to(dev), batch_size=args.batch,
                              preprocess=pre, train=True, seed=seed)  # fmt: skip
        it = iter(loader)
        out.append([next(it) for _ in range(n)])
    return out


def _timer(dev: torch.device) -> Callable[[Callable[[], None], int], float]:
    def run(step: Callable[[], None], steps: int) -> float:
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize(dev)
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - t0

    return run


def bench(model: str, k: int, args: argparse.Namespace, dev: torch.device) -> dict:
    precision = resolve_precision(args.precision, dev)
    nets = []
    for seed in range(k):
        torch.manual_seed(seed)
        nets.append(create_model(model).to(dev).to(memory_format=torch.channels_last))
    fused = FusedCifarNet(copy.deepcopy(nets)).to(dev).to(memory_format=torch.channels_last)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_seq = [make_sgd(m, **sgd) for m in nets]
    opt_fused = [make_sgd(m, **sgd) for m in fused.members]
    data = member_batches(args, dev, k, args.steps)
    ce = nn.CrossEntropyLoss()
    pos = {"seq": 0, "fused": 0}

    def seq_step() -> None:
        i = pos["seq"] % args.steps
        pos["seq"] += 1
        for net, opt, batches in zip(nets, opt_seq, data, strict=True):
            x, y = batches[i]
            with autocast(precision, dev):
                loss = ce(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def fused_step() -> None:
        i = pos["fused"] % args.steps
        pos["fused"] += 1
        x = stack_inputs([b[i][0] for b in data]).contiguous(memory_format=torch.channels_last)
        y = torch.stack([b[i][1] for b in data])
        with autocast(precision, dev):
            loss = member_losses(fused(x), y).sum()
        for opt in opt_fused:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opt_fused:
            opt.step()

    run = _timer(dev)
    run(seq_step, args.warmup)
    run(fused_step, args.warmup)
    t_seq, t_fused = [], []
    for _ in range(args.repeats):
        t_seq.append(run(seq_step, args.steps))
        t_fused.append(run(fused_step, args.steps))
    ts, tf = statistics.median(t_seq), statistics.median(t_fused)
    per_member = args.steps * args.batch
    return {
        "model": model,
        "k": k,
        "precision": precision,
        "seq_img_s_per_member": per_member / ts,
        "fused_img_s_per_member": per_member / tf,
        "speedup": ts / tf,
        # K seeds fused, in units of one seed's time (the GPU goal: at most 2 for K=5).
        "fused_time_over_one_seed": tf / (ts / k),
        "seq_seconds": t_seq,
        "fused_seconds": t_fused,
    }


def conv_only(k: int, dev: torch.device, dtype: torch.dtype, run) -> list[str]:
    """One 3x3 conv's forward+backward, grouped (K groups) against K separate convs: is the
    grouped kernel itself as fast per member? (CIFAR stage 1 and stage 3 shapes, batch 128)."""
    lines = []
    for c, h in ((16, 32), (64, 8)):
        fmt = torch.channels_last
        x = torch.randn(128, c * k, h, h, device=dev, dtype=dtype).contiguous(memory_format=fmt)
        w = torch.randn(c * k, c, 3, 3, device=dev, dtype=dtype)
        xs = [x[:, i * c : (i + 1) * c].contiguous(memory_format=fmt) for i in range(k)]
        ws = [w[i * c : (i + 1) * c].clone() for i in range(k)]
        for t in (x, w, *xs, *ws):
            t.requires_grad_()

        def grouped(x=x, w=w) -> None:  # bound now: the loop moves on
            torch.nn.functional.conv2d(x, w, padding=1, groups=k).sum().backward()

        def separate(xs=xs, ws=ws) -> None:
            for a, b in zip(xs, ws, strict=True):
                torch.nn.functional.conv2d(a, b, padding=1).sum().backward()

        run(grouped, 1)
        run(separate, 1)
        tg, ts = run(grouped, 5) / 5, run(separate, 5) / 5
        lines.append(f"conv 3x3 {c} ch/member @{h}x{h}, K={k}, {dtype}: grouped "
                     f"{tg * 1e3:.1f} ms, separate {ts * 1e3:.1f} ms (x{ts / tg:.2f})")  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="directory holding cifar-10-batches-py")
    p.add_argument("--synthetic", action="store_true", help="random images of CIFAR's shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--ks", default="2,5")
    p.add_argument("--steps", type=int, default=10, help="timed iterations per block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="alternating blocks; median counts")
    p.add_argument("--batch", type=int, default=128, help="per member; section 4.2: 128")
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--conv", action="store_true", help="also time one grouped conv vs K convs")
    args = p.parse_args()
    if not args.data and not args.synthetic:
        p.error("give --data DIR (real CIFAR-10) or --synthetic")
    dev = torch.device(args.device)
    info = {
        "hardware": hardware(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
    }
    print(info["hardware"])
    print(f"load average {load_average():.2f} (1 min) on {os.cpu_count()} cores")
    rows = []
    for model in args.models.split(","):
        for k in (int(s) for s in args.ks.split(",")):
            r = bench(model, k, args, dev)
            rows.append(r)
            print(
                f"{model:<9} K={k} {r['precision']}: sequential {r['seq_img_s_per_member']:7.1f} "
                f"img/s/member, fused {r['fused_img_s_per_member']:7.1f} -> x{r['speedup']:.2f}; "
                f"K seeds fused take {r['fused_time_over_one_seed']:.2f}x one seed's time",
                flush=True,
            )
    if args.conv:
        dtype = (
            torch.bfloat16 if resolve_precision(args.precision, dev) == "bf16" else torch.float32
        )
        for k in (int(s) for s in args.ks.split(",")):
            for line in conv_only(k, dev, dtype, _timer(dev)):
                print(line, flush=True)
                info.setdefault("conv", []).append(line)
    info["load_average_after"] = os.getloadavg()
    print(f"load average after: {info['load_average_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
