"""The on-device loader's steady-state step makes nothing on the host: no tensor from Python data,
no CPU-only op (randperm), no pinned staging buffer; the index of every step is a slice of one
per-epoch tensor already on the device, and the PCA-lighting constants stay where the batch is.

A CPU cannot show a host-to-device copy itself (a .to(cpu) of a CPU tensor dispatches nothing):
tests/cuda/test_cuda_training.py counts those, and host syncs, on a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import Preprocess
from reslab.data.transforms import PCALighting

# Ops that only the host side of a step would issue: a tensor made from Python data, a copy into
# pinned memory for an upload, a permutation drawn on the CPU generator.
HOST_OPS = ("lift_fresh", "lift_fresh_copy", "_pin_memory", "randperm", "scalar_tensor")


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _loader(*, lighting: PCALighting | None) -> TensorLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    pre = Preprocess(mode="per_channel", mean=[0.5, 0.4, 0.3], std=[0.25, 0.5, 0.2])
    return TensorLoader(images, torch.arange(64) % 10, batch_size=8, preprocess=pre, train=True,
                        seed=1, lighting=lighting)  # fmt: skip


def test_a_steady_state_step_issues_no_host_side_op() -> None:
    loader = _loader(lighting=PCALighting.imagenet(alphastd=0.1))
    it = iter(loader)
    next(it)  # the epoch's first batch: order uploaded, constants moved, once
    for _ in range(5):
        with _OpLog() as log:
            x, y = next(it)
        assert x.shape == (8, 3, 32, 32) and y.shape == (8,)
        host = [n for n in log.names if n in HOST_OPS]
        assert not host, f"host-side ops in a steady-state step: {host}"
        assert "randint" in log.names  # the log does see the step's own device work


def test_the_epoch_order_is_made_once_and_sliced_per_step() -> None:
    loader = _loader(lighting=None)
    with _OpLog() as log:
        batches = [y for _, y in loader]
    assert len(batches) == 8 and log.names.count("randperm") == 1  # one epoch, one permutation
    # The batches follow the CPU permutation of (seed, epoch 0): one sample order on any device.
    assert loader.epoch == 1
    loader.epoch = 0
    torch.testing.assert_close(torch.cat(batches), (torch.arange(64) % 10)[loader.epoch_order()])


def test_lighting_constants_move_once_and_std_is_cached() -> None:
    light = PCALighting.imagenet(alphastd=0.1)
    loader = _loader(lighting=light)
    it = iter(loader)
    next(it)
    vec, std = light.eigvec, loader.preprocess.channel_std(loader.device)
    next(it)
    # Same tensor objects after another step: nothing was copied again.
    assert light.eigvec is vec and loader.preprocess.channel_std(loader.device) is std
    assert vec.device == std.device == loader.device
