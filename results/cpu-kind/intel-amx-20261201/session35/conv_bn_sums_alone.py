# Session 35: conv + BN forward with the sums from the convolution kernel (needs conv_bn_sums_dropped.diff applied)
import time, statistics, torch
from reslab.models.bn_act import load_kernel
ext = load_kernel()
CL = torch.channels_last
sweep = [torch.zeros(128, 16, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=CL) for _ in range(12)]
def t(f, cold, reps=40):
    ts = []
    for _ in range(reps + 3):
        if cold:
            for s in sweep: s.add_(1)
        a = time.perf_counter(); f(); ts.append(time.perf_counter() - a)
    return statistics.median(ts[3:]) * 1e3
for c, h in ((16, 32), (32, 16), (64, 8)):
    x = torch.randn(128, c, h, h).bfloat16().contiguous(memory_format=CL)
    w = torch.randn(c, c, 3, 3).bfloat16().contiguous(memory_format=CL)
    g, b, sh = torch.ones(c), torch.zeros(c), torch.zeros(c)
    def old():
        y = ext.conv3x3_forward(x, w)
        ext.forward_train(y, None, g, b, sh.clone(), torch.ones(c), torch.zeros((), dtype=torch.long), 0.1, 1e-5)
    def new():
        y, s = ext.conv3x3_forward_stats(x, w, sh)
        ext.forward_train(y, None, g, b, sh.clone(), torch.ones(c), torch.zeros((), dtype=torch.long), 0.1, 1e-5, s)
    def conv_only(): ext.conv3x3_forward(x, w)
    def conv_stats(): ext.conv3x3_forward_stats(x, w, sh)
    y = ext.conv3x3_forward(x, w)
    def bn_only(): ext.forward_train(y, None, g, b, sh.clone(), torch.ones(c), torch.zeros((), dtype=torch.long), 0.1, 1e-5)
    for cold in (False, True):
        r = {k: min(t(f, cold) for _ in range(2)) for k, f in (("conv+bn", old), ("conv+stats+bn(sums)", new), ("conv", conv_only), ("conv+stats", conv_stats), ("bn", bn_only))}
        print(c, h, "evicted" if cold else "cache", " ".join(f"{k} {v:.3f}" for k, v in r.items()))
