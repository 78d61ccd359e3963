"""How long a user waits the first time reslab's CPU kernels are compiled, against an older revision.

The kernels (kernels/*.cpp, built by reslab/models/bn_act.py) compile on first use, on the
user's machine, before the first training step. Each round compiles this tree's kernels and
those of git revision REF (default: 010b5b9, the last whose every file included
<torch/extension.h>) from scratch, alternating, each in a fresh process with an empty
TORCH_EXTENSIONS_DIR and cache home, and reports the wall time of `load_kernel()` (the import
of torch and reslab excluded). Both use the same compiler, flags and torch.

    python benchmarks/bench_kernel_build.py [--ref 010b5b9] [--rounds 2]

Run it on a quiet machine: the compiles use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from common import hardware, load_average

ROOT = Path(__file__).resolve().parent.parent
# Prints the seconds load_kernel() took and the build's vector code, as JSON.
_PROBE = (
    "import json, time; from reslab.models import bn_act; t = time.perf_counter(); "
    "ext = bn_act.load_kernel(); dt = time.perf_counter() - t; "
    "print(json.dumps({'s': dt, 'simd': ext.simd() if ext else None, 'src': bn_act.__file__}))"
)


def _tree_at(ref: str, dest: Path) -> Path:
    """src/reslab of git revision `ref` under dest (git archive: no checkout touched)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src/reslab"],
                          check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _cold_build(src: Path, ext_dir: Path) -> dict:
    # XDG_CACHE_HOME too: revisions before 33's ignored TORCH_EXTENSIONS_DIR and built under
    # torch's default root (~/.cache/torch_extensions), where a build of theirs would be found.
    env = {**os.environ, "PYTHONPATH": str(src), "TORCH_EXTENSIONS_DIR": str(ext_dir),
           "XDG_CACHE_HOME": str(ext_dir / "xdg")}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"bench_kernel_build: the build under {src} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["simd"] is None or not out["src"].startswith(str(src)):
        raise SystemExit(f"bench_kernel_build: {src} did not build its own kernels: {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="010b5b9", help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(hardware())
    print(f"load average at the start: {load_average():.2f}; compiler: "
          f"{subprocess.run(['c++', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")  # fmt: skip
    times: dict[str, list[float]] = {"this tree": [], args.ref: []}
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"this tree": ROOT / "src", args.ref: _tree_at(args.ref, Path(tmp) / "ref")}
        for rnd in range(args.rounds):
            order = list(srcs) if rnd % 2 == 0 else list(srcs)[::-1]
            for i, name in enumerate(order):
                out = _cold_build(srcs[name], Path(tmp) / f"ext-{rnd}-{i}")
                times[name].append(out["s"])
                print(f"round {rnd + 1}: {name:>10}  cold build {out['s']:6.1f} s  ({out['simd']})",
                      flush=True)  # fmt: skip
    new, old = statistics.median(times["this tree"]), statistics.median(times[args.ref])
    print(f"median cold build: this tree {new:.1f} s, {args.ref} {old:.1f} s: x{old / new:.2f} "
          f"faster ({args.rounds} rounds, alternating)")  # fmt: skip


if __name__ == "__main__":
    main()
