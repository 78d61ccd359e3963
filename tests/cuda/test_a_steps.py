"""A steady-state training step on the card: no host-to-device copy, no host synchronisation;
bf16 is native; --jobs workers take the visible GPUs in turn."""

from __future__ import annotations

from pathlib import Path

import torch
from cuda_helpers import cuda_cfg, needs_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import Preprocess
from reslab.data.transforms import PCALighting
from reslab.engine.trainer import Trainer
from reslab.experiments.runner import worker_device
from reslab.runtime.precision import resolve_precision

pytestmark = needs_cuda


class _HostToDevice(TorchDispatchMode):
    """Counts ops that read a CPU tensor and produce a CUDA one: host-to-device copies."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        host = any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
                   for t in flat)  # fmt: skip
        outs = torch.utils._pytree.tree_leaves(out)
        if host and any(isinstance(t, torch.Tensor) and t.is_cuda for t in outs):
            self.copies.append(str(func))
        return out


def test_bf16_is_native_and_auto_picks_it() -> None:
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_jobs_workers_take_the_visible_gpus_in_turn() -> None:
    n = torch.cuda.device_count()
    assert [worker_device("auto", i) for i in range(3)] == [f"cuda:{i % n}" for i in range(3)]


def test_the_loader_copies_nothing_from_the_host_per_step() -> None:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, generator=g).to(dev)
    pre = Preprocess(mode="per_channel", mean=[0.5, 0.4, 0.3], std=[0.25, 0.5, 0.2])
    loader = TensorLoader(images, torch.arange(1024, device=dev) % 10, batch_size=128,
                          preprocess=pre, train=True, lighting=PCALighting.imagenet())  # fmt: skip
    it = iter(loader)
    next(it)  # the epoch's order and the lighting constants go up once, here
    torch.cuda.set_sync_debug_mode("error")
    try:
        with _HostToDevice() as watch:
            for _ in range(5):
                x, y = next(it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.is_cuda and y.is_cuda and not watch.copies, watch.copies


class _SyncWatch:
    """The real loader, with torch.cuda.set_sync_debug_mode("error") on from the run's batch
    `start` to batch `stop` (exclusive, counted over epochs): any host synchronisation in those
    steps, or in making their batches, raises."""

    def __init__(self, loader, start: int, stop: int) -> None:
        self.loader, self.start, self.stop, self.seen = loader, start, stop, 0

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        try:
            for batch in self.loader:
                on = self.start <= self.seen < self.stop
                torch.cuda.set_sync_debug_mode("error" if on else "default")
                self.seen += 1
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_no_host_sync_inside_steady_state_training_steps(cifar_root: Path, tmp_path: Path) -> None:
    # One log/eval/save at the last step only: steps 6..29 must not synchronise at all, the
    # epoch boundary (20 steps an epoch here) included.
    trainer = Trainer(cuda_cfg(cifar_root, tmp_path / "run", iters=30), progress=False)
    trainer.data.train = _SyncWatch(trainer.data.train, 5, 29)
    final = trainer.fit()
    assert final["iter"] == 30


def test_option_a_blocks_combined_op_gives_the_separate_gradients_on_the_card(monkeypatch) -> None:
    """layers._ConvSubsamplePad (conv1 and the option-A shortcut as one op, the shortcut's
    gradient added in place) under CUDA bf16 autocast, channels_last: the same parameter
    gradients as separate calls (cuDNN deterministic), and the op ran at both option-A blocks."""
    import copy

    import torch.nn.functional as F

    from reslab.models import create_model, layers

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    dev, cl = torch.device("cuda"), torch.channels_last
    model = create_model("resnet20").to(dev, memory_format=cl)
    x = torch.randn(16, 3, 32, 32, device=dev).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (16,), device=dev)
    calls, apply = [0], layers._ConvSubsamplePad.apply

    def counted(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(layers._ConvSubsamplePad, "apply", counted)
    grads = []
    for combined in (True, False):
        if not combined:
            monkeypatch.setattr(layers.PadShortcut, "with_conv", lambda self, conv, x: None)
        net = copy.deepcopy(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            F.cross_entropy(net(x), y).backward()
        grads.append([p.grad for p in net.parameters()])
    assert calls[0] == 2
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
