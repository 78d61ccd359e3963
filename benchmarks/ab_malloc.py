"""Session 41: glibc's malloc thresholds set by reslab.runtime.memory.tune_malloc against glibc's
defaults (RESLAB_MALLOC=0), each measurement in a fresh process (a process that has freed a
large block has moved glibc's thresholds by itself, so both sides start from scratch), the two
alternating over rounds.

Part 1: InferenceModel (precision auto: bf16 here) on random inputs, median ms a call and the
process's peak RSS. Part 2: `reslab predict` of a folder of 96 random 320x256 JPEGs with a
random ResNet-50 (decoding included), images/s as it prints them.

    python benchmarks/ab_malloc.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import hardware, load_average

CASES = (("resnet20", 32, 64, 100), ("resnet20", 32, 256, 30), ("resnet50", 224, 8, 12),
         ("resnet50", 224, 32, 5))  # fmt: skip

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[5])  # benchmarks/: bench_infer's timing, median of the calls
from bench_infer import images_per_s
from reslab.inference import InferenceModel
from reslab.models import create_model
name, side, batch, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
runner = InferenceModel(create_model(name).eval())
x = torch.randn(batch, 3, side, side)
ips = images_per_s(runner, x, iters=calls, warmup=3)
peak = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
print(batch / ips * 1e3, int(peak) / 1024)
"""


def child_env(tuned: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["RESLAB_MALLOC"] = "1" if tuned else "0"
    return env


def make_folder(root: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from reslab.models import create_model
    from reslab.models.weights import save_safetensors

    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(96):
        img = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "imgs" / f"{i:03d}.jpg", quality=85)
    weights = save_safetensors(create_model("resnet50").eval(), root / "r50.safetensors",
                               model_name="resnet50", model_options={}, preprocess=None,
                               classes=None)  # fmt: skip
    return root / "imgs", Path(weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(hardware())
    print(f"load average at start {load_average():.2f}; {args.rounds} rounds, fresh processes\n")
    print(f"{'case':24} {'glibc default':>14} {'tuned':>10}  ratio   peak RSS MB default/tuned")
    for name, side, batch, calls in CASES:
        ms: dict[bool, list[float]] = {False: [], True: []}
        rss: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for tuned in (False, True) if r % 2 == 0 else (True, False):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, name, str(side), str(batch), str(calls),
                     str(Path(__file__).resolve().parent)],
                    env=child_env(tuned), text=True, capture_output=True, check=True,
                ).stdout.split()  # fmt: skip
                ms[tuned].append(float(out[0]))
                rss[tuned].append(float(out[1]))
        off, on = statistics.median(ms[False]), statistics.median(ms[True])
        print(f"{name} {side}px batch {batch:<4} {off:11.2f} ms {on:7.2f} ms  x{off / on:.2f}   "
              f"{statistics.median(rss[False]):.0f} / {statistics.median(rss[True]):.0f}",
              flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        folder, weights = make_folder(Path(d))
        rates: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for tuned in (False, True) if r % 2 == 0 else (True, False):
                err = subprocess.run(
                    [sys.executable, "-m", "reslab", "predict", str(folder), "--weights",
                     str(weights), "--normalize", "imagenet"],
                    env=child_env(tuned), text=True, capture_output=True, check=True,
                ).stderr  # fmt: skip
                rates[tuned].append(float(re.search(r"\(([\d.]+) images/s", err).group(1)))
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"{'predict 96 JPEGs, R50':24} {off:8.1f} img/s {on:6.1f} img/s  x{on / off:.2f}")
    print(f"\nmedians over rounds; load average at end {load_average():.2f}")


if __name__ == "__main__":
    main()
