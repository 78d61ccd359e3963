"""Session 35: the transition op's conv1 from the AMX stride-2 forward (amx_stride2_forward_dropped.diff
applied) against oneDNN's (a build with RESLAB_BLOCK_S2_FWD=0), alternating rounds of the default
step. Run from benchmarks/: python ../results/cpu-kind/intel-amx-20261201/session35/ab_stride2_forward.py
--data ../../shared/data"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))
from common import ab_arguments, alternating_rounds, amx_kernel, cifar_default_step, hardware, kernel_variant, print_rounds
from reslab.models import bn_act
a = ab_arguments(rounds=10, steps=20)
a.add_argument("--batch", type=int, default=128); a.add_argument("--size", type=int, default=32)
args = a.parse_args()
print(hardware())
new = amx_kernel()
old = kernel_variant("_s2off", "RESLAB_BLOCK_S2_FWD=0")
precision, _, step = cifar_default_step(args.data, args.model, batch=args.batch, size=args.size)
def sw(e):
    def f(): bn_act._EXT = e
    return f
rates = alternating_rounds({"oneDNN s2": sw(old), "AMX s2": sw(new)}, step, rounds=args.rounds, steps=args.steps, batch=args.batch)
bn_act._EXT = new
print_rounds(args.model, precision, args.rounds, args.steps, rates, "oneDNN s2", "AMX s2", batch=args.batch)
