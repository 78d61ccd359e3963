"""Test error of a checkpoint in fp32 and bf16 (kernel / eager blocks), and how many of the
10k predictions each bf16 path shares with fp32. From the repository root, CIFAR-10 under
../shared/data:

    python results/cpu-kind/intel-amx-20261201/session39/fp32_check.py CHECKPOINT flip|flip-shift
"""
import sys, torch
from reslab.engine import evaluator
from reslab.engine.eval_run import load_checkpoint_model, fast_eval_model
from reslab.data.cifar import load_cifar
from reslab.models import block_op
from reslab.engine import views as V
dev = torch.device("cpu")
path, views = sys.argv[1], sys.argv[2]
m = load_checkpoint_model(path, device=dev)
net = fast_eval_model(m.model, dev)
test = load_cifar("../shared/data", dataset="cifar10", split="test")
x, y = m.preprocess.normalize(test.images), test.labels
preds = {}
for name, prec, infer in (("fp32", "fp32", True), ("kernel", "bf16", True), ("eager", "bf16", False)):
    block_op.INFER = infer
    out = []
    with torch.no_grad():
        for i in range(0, 10000, 500):
            from reslab.runtime.precision import autocast
            with autocast(prec, dev):
                v = {'flip': V.flip, 'flip-shift': V.flip_shift}[views](x[i:i+500])
                b = v.shape[1]
                logits = torch.cat([net(v[:, j].contiguous(memory_format=torch.channels_last)).float().softmax(1).unsqueeze(1) for j in range(b)], 1).mean(1)
            out.append(logits.argmax(1))
    preds[name] = torch.cat(out)
    err = (preds[name] != torch.as_tensor(y)).float().mean().item() * 100
    print(f"{name}: test error {err:.2f}%", flush=True)
for k in ("kernel", "eager"):
    print(f"{k} predictions equal to fp32's: {(preds[k] == preds['fp32']).sum().item()} of 10000")
