"""Seconds for the 6-view (flip-shift) test of 10k CIFAR-10 images by a folded ResNet-20 checkpoint,
by images per forward pass (reslab.engine.evaluator.FORWARD_CHUNK); 3 rounds, medians.

    python results/cpu-kind/intel-amx-20261201/session38/eval_chunk.py CHECKPOINT
"""
import time, sys, torch
from reslab.engine import evaluator
from reslab.engine.eval_run import load_checkpoint_model, fast_eval_model
from reslab.data.cifar import load_cifar
dev = torch.device("cpu")
path = sys.argv[1]
m = load_checkpoint_model(path, device=dev)
net = fast_eval_model(m.model, dev)
test = load_cifar("../shared/data", dataset="cifar10", split="test")
x, y = m.preprocess.normalize(test.images), test.labels
batches = [(x[i:i + 500], y[i:i + 500]) for i in range(0, 10000, 500)]
res = {}
for rnd in range(3):
    for chunk in (64, 128, 256, 512, 1024):
        evaluator.FORWARD_CHUNK = chunk
        t = time.perf_counter()
        r = evaluator.evaluate(net, batches, device=dev, precision="bf16", views="flip-shift")
        dt = time.perf_counter() - t
        res.setdefault(chunk, []).append(dt)
        print(rnd, chunk, f"{dt:.2f} s", r.top1_error, flush=True)
for c, v in res.items():
    print(c, "median", sorted(v)[1])
