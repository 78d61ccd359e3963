"""torch.compile on the card: reduce-overhead compiles ResNet-20's training forward once and
replays it as CUDA graphs (never skipped), and the compiled net trains as eager does."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from cuda_helpers import cuda_cfg, needs_cuda
from torch._dynamo.utils import counters

from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.engine.schedules import make_sgd
from reslab.engine.trainer import train
from reslab.models import create_model

pytestmark = needs_cuda


def test_reduce_overhead_compiles_once_and_never_skips_cuda_graphs(
    cifar_root: Path, tmp_path: Path
) -> None:
    torch._dynamo.reset()
    counters.clear()
    cfg = cuda_cfg(cifar_root, tmp_path / "run", iters=40, eval_every=20, save_every=20,
                   log_every=10, compile=True, compile_mode="reduce-overhead")  # fmt: skip
    final = train(cfg, progress=False)
    assert final["iter"] == 40
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_eager_and_compiled_agree_on_loss_and_bn_statistics(cifar_root: Path) -> None:
    from reslab.data.cifar import load_cifar

    dev = torch.device("cuda")
    train_split = load_cifar(cifar_root, split="train")
    images, labels = train_split.images[:1280].to(dev), train_split.labels[:1280].to(dev)
    pre = cifar_preprocess("per_pixel", images.cpu())
    torch.manual_seed(0)
    eager = create_model("resnet20").to(dev, memory_format=torch.channels_last)
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, mode="reduce-overhead")  # as the trainer compiles
    losses = {}
    for name, net, params in (("eager", eager, eager), ("compiled", compiled, twin)):
        opt = make_sgd(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        loader = TensorLoader(images, labels, batch_size=128, preprocess=pre, train=True)
        losses[name] = []
        for x, y in loader:  # 10 steps, the same batches for both
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    # bf16 autocast on both sides, kernels fused differently: agreement to bf16's precision.
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=3e-2, atol=3e-2)
    for (k, a), b in zip(eager.named_buffers(), twin.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2, msg=k)
