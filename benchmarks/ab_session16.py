"""Session 16's two training-step changes against the code they replaced, in one process.

On this VM the speed of bf16 work drifts by up to 1.4x within minutes, so two benchmark runs
minutes apart cannot show a 5-10% change. Here one model trains on real CIFAR-10 batches (the
TensorLoader path `reslab train` uses) while the code path switches every round:

  session 15: the BN+ReLU kernel of commit a553b98 (auto-vectorised loops; the backward reads the
              saved output y for the ReLU's mask) and the option-A shortcut as autograd's own
              x[:, :, ::2, ::2] + F.pad, whose backward returns an NCHW gradient in a
              channels_last net;
  session 16: the current kernel (AVX-512 code, the mask kept as 1 bit per value) and
              layers._SubsamplePad (gradient in x's layout).

The old kernel is compiled from git history (`git show a553b98:...`), so this needs the
repository's history and a C++ compiler. `--change kernel` or `--change shortcut` reverts only
that one. Prints img/s per round and the per-round ratio. Since session 20 the current kernel
runs on torch's OpenMP threads while the old one, built here without -fopenmp, runs on one, so
the kernel ratio now includes that change too (`ab_threads.py` measures it alone).

    python benchmarks/ab_session16.py --data ../shared/data [--change both] [--rounds 10]
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import torch
import torch.nn.functional as F

from common import ab_arguments, alternating_rounds, cifar_default_step, hardware
from reslab.models import bn_act
from reslab.models.bn_act import _ninja_on_path, load_kernel
from reslab.models.layers import PadShortcut

OLD = "a553b98"  # the last session-15 commit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_old_kernel():
    from torch.utils.cpp_extension import load

    src = subprocess.run(
        ["git", "show", f"{OLD}:src/reslab/models/kernels/bn_act.cpp"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    d = tempfile.mkdtemp(prefix="reslab-ab16-")
    path = os.path.join(d, "bn_act_old.cpp")
    with open(path, "w") as f:
        f.write(src)
    with _ninja_on_path():
        return load(name="reslab_bn_act_old", sources=[path], build_directory=d,
                    extra_cflags=["-O3", "-march=native", "-fno-math-errno"])  # fmt: skip


def old_function(ext):
    class OldBNAct(torch.autograd.Function):
        """Session 15's _BNAct: saves y and reads it in backward for the ReLU's mask (called as
        today's bn_relu calls it: the running statistics updated here, as session 15 did)."""

        @staticmethod
        def forward(ctx, x, r, weight, bias, bn):  # type: ignore[override]
            if r is not None:
                r = r.contiguous(memory_format=torch.channels_last)
            y, mean, var, rstd = ext.forward(x, r, weight, bias, bn.running_mean.clone(), bn.eps)
            m = x.numel() // x.shape[1]
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * (m / (m - 1)), bn.momentum)
            bn.num_batches_tracked.add_(1)
            ctx.save_for_backward(x, y, mean, rstd, weight)
            ctx.with_residual = r is not None
            return y

        @staticmethod
        def backward(ctx, dy):  # type: ignore[override]
            x, y, mean, rstd, weight = ctx.saved_tensors
            dy = dy.contiguous(memory_format=torch.channels_last)
            dx, dw, db, dr = ext.backward(dy, x, y, mean, rstd, weight, ctx.with_residual)
            return dx, (dr if ctx.with_residual else None), dw, db, None

    return OldBNAct


def old_pad_forward(self, x):
    """Session 15's PadShortcut.forward."""
    if self.stride > 1:
        x = x[:, :, :: self.stride, :: self.stride]
    if self.pad != (0, 0):
        x = F.pad(x, (0, 0, 0, 0, *self.pad))
    return x


def main() -> None:
    p = ab_arguments()
    p.add_argument("--change", choices=("both", "kernel", "shortcut"), default="both",
                   help="which of the two changes the 'session 15' path reverts")  # fmt: skip
    args = p.parse_args()
    print(hardware())
    load_kernel()
    new = (bn_act._BNAct, PadShortcut.forward)
    old = (
        old_function(build_old_kernel()) if args.change in ("both", "kernel") else new[0],
        old_pad_forward if args.change in ("both", "shortcut") else new[1],
    )
    paths = {"session 15": old, "session 16": new}
    precision, _, step = cifar_default_step(args.data, args.model)

    def switch(k: str):
        def to_k() -> None:
            bn_act._BNAct, PadShortcut.forward = paths[k]

        return to_k

    try:
        rates = alternating_rounds({k: switch(k) for k in paths}, step, rounds=args.rounds,
                                   steps=args.steps)  # fmt: skip
    finally:
        bn_act._BNAct, PadShortcut.forward = new
    print(f"{args.model} training step, batch 128, {precision}, {args.rounds} alternating rounds "
          f"of {args.steps} steps each; reverted in 'session 15': {args.change}")  # fmt: skip
    for k, v in rates.items():
        print(f"{k}: img/s per round " + " ".join(f"{a:.0f}" for a in v)
              + f"; best {max(v):.0f}, median {sorted(v)[len(v) // 2]:.0f}")  # fmt: skip
    ratio = sorted(b / a for a, b in zip(*rates.values()))
    print("session 16 / session 15 per round: " + " ".join(f"{r:.3f}" for r in ratio)
          + f" (sorted); median x{ratio[len(ratio) // 2]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
