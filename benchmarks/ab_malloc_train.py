"""Session 43: CPU training with glibc's malloc thresholds set by reslab.runtime.memory.tune_malloc
(what the trainer now does on the CPU) against glibc's defaults (RESLAB_MALLOC=0), each
measurement in a fresh process, the two alternating over rounds (as ab_malloc.py for inference).

glibc's own mmap threshold rises only to 32 MiB, so at 224px a step's larger activations (the
stem's output at 32 images: 51 MB in bf16) came from fresh mappings and were page-faulted in on
every step. Part 1: reslab's default CPU training step (channels_last, autocast where native,
its CPU paths) on random 224px batches, median seconds of the steps after 3, peak RSS. Part 2:
`reslab train` on an image folder (480 JPEGs of 320x256 upscaled from CIFAR-10's test images,
48 per class; imagenet-paper recipe at batch 32, 40 iterations) and Part 3: `reslab train
--recipe cifar10-fast`, 200 iterations (its activations stay under glibc's own threshold): the
mean img/s of the last 2/3 of the run's log rows and the command's wall time.

    python benchmarks/ab_malloc_train.py --data ../../shared/data [--rounds 3] [--parts 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ab_malloc import child_env
from common import hardware, load_average

CASES = (("resnet18", 32, 11), ("resnet50", 32, 8), ("resnet18", 128, 6))  # model, batch, steps

CHILD = r"""
import resource, statistics, sys, time
import torch, torch.nn.functional as F
from reslab.runtime.memory import tune_malloc
tune_malloc()  # a no-op under RESLAB_MALLOC=0
from reslab.engine.schedules import make_sgd
from reslab.models import create_model
from reslab.models.cpu_paths import use_cpu_training_paths
from reslab.runtime.precision import autocast, resolve_precision
name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dev = torch.device("cpu")
precision = resolve_precision("auto", dev)
torch.manual_seed(0)
model = create_model(name).to(memory_format=torch.channels_last)
use_cpu_training_paths(model, precision=precision)
opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (batch,))
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    with autocast(precision, dev):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
print(statistics.median(times[3:]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def make_folder(data: Path, root: Path) -> Path:
    """The first 48 test images of each CIFAR-10 class as 320x256 JPEGs in class folders."""
    from PIL import Image

    from reslab.data.cifar import load_cifar

    split = load_cifar(data, split="test")
    count: dict[int, int] = {}
    for image, label in zip(split.images.permute(0, 2, 3, 1).numpy(), split.labels.tolist(),
                            strict=True):  # fmt: skip
        if count.get(label, 0) < 48:
            count[label] = count.get(label, 0) + 1
            (root / f"c{label}").mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(image).resize((320, 256), Image.BICUBIC)
            big.save(root / f"c{label}" / f"{count[label]}.jpg", quality=90)
    return root


def train_run(args: list[str], out: Path, tuned: bool, tail: float) -> tuple[float, float]:
    """(img/s: the mean of the last `tail` of the log's rows, wall seconds)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reslab", "train", *args, "--out", str(out),
                    "--eval-every", "100000"], env=child_env(tuned), text=True,
                   capture_output=True, check=True)  # fmt: skip
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    rows = rows[-max(1, int(len(rows) * tail)) :]
    return statistics.mean(r["images_per_s"] for r in rows), wall


def alternate(rounds: int, measure) -> dict[bool, list]:
    got: dict[bool, list] = {False: [], True: []}
    for r in range(rounds):
        for tuned in (False, True) if r % 2 == 0 else (True, False):
            got[tuned].append(measure(tuned, r))
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="directory holding cifar-10-batches-py")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="1,2,3", help="which parts to run")
    args = p.parse_args()
    parts = {int(x) for x in args.parts.split(",")}
    print(hardware())
    print(f"load average at start {load_average():.2f}; {args.rounds} rounds, fresh processes\n")
    print(f"{'training step, 224px':24} {'glibc default':>14} {'tuned':>10}  ratio   "
          "peak RSS MB default/tuned")  # fmt: skip
    for name, batch, steps in CASES if 1 in parts else ():

        def step(tuned: bool, r: int, name=name, batch=batch, steps=steps) -> tuple[float, float]:
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(batch), str(steps)],
                                 env=child_env(tuned), text=True, capture_output=True,
                                 check=True).stdout.split()  # fmt: skip
            return float(out[0]), float(out[1])

        got = alternate(args.rounds, step)
        off, on = (statistics.median(s for s, _ in got[k]) for k in (False, True))
        rss = [statistics.median(m for _, m in got[k]) for k in (False, True)]
        print(f"{name} batch {batch:<13} {off * 1e3:11.0f} ms {on * 1e3:7.0f} ms  "
              f"x{off / on:.2f}   {rss[0]:.0f} / {rss[1]:.0f}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        folder = make_folder(Path(args.data), Path(d) / "imgs") if 2 in parts else None
        runs = {
            "folder R18 b32 40 it": (["--dataset", "folder", "--data", str(folder), "--model",
                                      "resnet18", "--recipe", "imagenet-paper", "--iters", "40",
                                      "--set", "batch_size=32"], 2 / 3),
            "cifar10-fast 200 it": (["--recipe", "cifar10-fast", "--data", args.data,
                                     "--iters", "200"], 2 / 3),
        }  # fmt: skip
        print(f"\n{'reslab train':24} {'glibc default':>14} {'tuned':>10}  ratio   "
              "wall s default/tuned")  # fmt: skip
        for part, (label, (cmd, tail)) in enumerate(runs.items(), 2):
            if part not in parts:
                continue
            got = alternate(
                args.rounds,
                lambda tuned, r, cmd=cmd, tail=tail, part=part: train_run(
                    cmd, Path(d) / f"part{part}-run{r}{int(tuned)}", tuned, tail
                ),
            )
            off, on = (statistics.median(i for i, _ in got[k]) for k in (False, True))
            wall = [statistics.median(w for _, w in got[k]) for k in (False, True)]
            print(f"{label:24} {off:8.1f} img/s {on:6.1f} img/s  x{on / off:.2f}   "
                  f"{wall[0]:.1f} / {wall[1]:.1f}", flush=True)  # fmt: skip
    print(f"\nmedians over rounds; load average at end {load_average():.2f}")


if __name__ == "__main__":
    main()
