"""Data-parallel throughput: the real `reslab train` on 1 and 2 processes, and what the
torchrun + DDP wrapper costs on one device.

CPU (always): ResNet-20 on real CIFAR-10, global batch 128, the same recipe run
  1. as one plain process (all cores, then half of them),
  2. as 2 processes under torchrun (gloo; each takes 64 of every 128 and half the cores),
  3. as 1 process under torchrun with RESLAB_FORCE_DDP=1 (gloo group + DDP wrapper, no peers).
GPU (only when torch sees CUDA): one GPU without torchrun vs one GPU under torchrun with NCCL
  initialised and the model in DDP (RESLAB_FORCE_DDP=1): the wrapper should cost nothing.

img/s is the trainer's own figure (metrics.jsonl `images_per_s`) over the iterations after
`--warmup` (the first interval, with start-up and first-iteration costs, is discarded;
evaluation and checkpoint time lie outside the timed intervals).

    python benchmarks/bench_distributed.py --data ../shared/data [--iters 40] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import hardware, load_average


def run(
    nproc: int | None, *, data: str, device: str, iters: int, warmup: int, precision: str,
    batch: int, force_ddp: bool = False, threads: int | None = None, timeout: float = 1800,
) -> float:  # fmt: skip
    """images/s of `reslab train` for iterations warmup+1..warmup+iters; nproc None = no torchrun."""
    with tempfile.TemporaryDirectory(prefix="reslab-bench-dist-") as tmp:
        out = Path(tmp) / "run"
        train = ["-m", "reslab", "train", "--model", "resnet20", "--data", data, "--out", str(out),
                 "--device", device, "--precision", precision, "--iters", str(warmup + iters),
                 "--eval-every", str(warmup), "--save-every", str(10**9),
                 "--set", f"batch_size={batch}", "--set", "val_split=false",
                 "--set", "eval_splits=[test]", "--set", "eval_subset=500",
                 "--set", "log_every=10", "--set", "milestones=[]"]  # fmt: skip
        if nproc is None:
            cmd = [sys.executable, *train]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", *train]  # fmt: skip
        env = {**os.environ, "RESLAB_FORCE_DDP": "1" if force_ddp else "0"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        timed = [r["images_per_s"] for r in rows[1:]]  # equal intervals after the warm-up one
        return len(timed) / sum(1.0 / v for v in timed)  # total images / total time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("RESLAB_DATA", "data"))
    ap.add_argument("--iters", type=int, default=40, help="timed iterations per configuration")
    ap.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    args.iters = max(args.warmup, args.iters // args.warmup * args.warmup)  # whole intervals
    print(hardware())
    print(f"load average {load_average():.2f} (other work on the machine skews these numbers)")
    cores = os.cpu_count() or 1
    common = dict(data=args.data, iters=args.iters, warmup=args.warmup, batch=args.batch,
                  precision=args.precision)  # fmt: skip

    print(f"\nCPU, ResNet-20, global batch {args.batch}, {args.iters} timed iterations")
    half = max(1, cores // 2)
    one = run(None, device="cpu", threads=cores, **common)
    print(f"  1 process, {cores} threads{'':27}{one:8.1f} img/s")
    one1 = run(None, device="cpu", threads=half, **common)
    print(f"  1 process, {half} thread(s){'':26}{one1:8.1f} img/s  ({one1 / one:.2f}x)")
    two = run(2, device="cpu", threads=half, **common)
    print(
        f"  2 processes (torchrun, gloo), {half} thread(s) each  {two:8.1f} img/s  ({two / one:.2f}x)"
    )
    ddp1 = run(1, device="cpu", threads=cores, force_ddp=True, **common)
    print(f"  1 process under torchrun + DDP (gloo){'':7}{ddp1:8.1f} img/s  ({ddp1 / one:.2f}x)")

    if not torch.cuda.is_available():
        print("\nGPU comparison skipped: torch sees no CUDA device on this machine "
              "(run this script on a GPU machine for it).")  # fmt: skip
        return
    print(f"\nGPU {torch.cuda.get_device_name()}, same recipe")
    plain = run(None, device="cuda", **common)
    print(f"  1 GPU, no torchrun                         {plain:8.1f} img/s")
    nccl = run(1, device="cuda", force_ddp=True, **common)
    print(f"  1 GPU under torchrun, NCCL + DDP           {nccl:8.1f} img/s  ({nccl / plain:.2f}x)")


if __name__ == "__main__":
    main()
