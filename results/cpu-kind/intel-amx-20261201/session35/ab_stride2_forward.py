import sys
sys.path.insert(0, "/work/main/benchmarks")
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
