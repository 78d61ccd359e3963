"""TensorLoader's training batches from the CPU kernels' crop_normalize (kernels/augment.cpp):
the batches of the tensor ops, bit for bit, in every configuration the kernel takes, and the
tensor ops wherever it does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.data.transforms import PCALighting
from reslab.models.bn_act import load_kernel

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="no C++ toolchain for the kernel")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)  # -0.0 and 0.0 differ, as they must not


def _batches(images, labels, kernel: bool, monkeypatch, steps: int = 3, **kw):
    """(x, y, whether the kernel made it) for the first `steps` training batches."""
    calls = []
    real = TensorLoader._augmented_by_kernel

    def spy(self, idx, step):
        out = real(self, idx, step) if kernel else None
        calls.append(out is not None)
        return out

    with monkeypatch.context() as m:
        m.setattr(TensorLoader, "_augmented_by_kernel", spy)
        loader = TensorLoader(images, labels, train=True, **kw)
        it = iter(loader)
        got = [next(it) for _ in range(steps)]
    return got, calls


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pad": 0},  # mirror only
        {"flip": False},  # crops only
        {"alternate_flip": True},
        {"rank": 1, "world_size": 2},  # this rank's half of the global batch's draws
        {"channels_last": False},
        {"small_size": 24, "small_iters": 10**6},  # progressive resizing after the crop
        {"seed": 7, "pad": 2},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
@pytest.mark.parametrize("mode", ["per_pixel", "per_channel"])
def test_kernel_batches_are_the_tensor_ops_bits(cifar_root: Path, mode, kw, monkeypatch) -> None:
    train = load_cifar(cifar_root, split="train")
    images, labels = train.images[:2048], train.labels[:2048]
    pre = cifar_preprocess(mode, images)
    kw = {"batch_size": 64, "preprocess": pre, **kw}
    ref, used_ref = _batches(images, labels, False, monkeypatch, **kw)
    got, used = _batches(images, labels, True, monkeypatch, **kw)
    assert used == [True] * 3 and used_ref == [False] * 3
    for (xr, yr), (xg, yg) in zip(ref, got, strict=True):
        assert torch.equal(yr, yg) and xr.shape == xg.shape and xr.stride() == xg.stride()
        assert torch.equal(_bits(xr), _bits(xg))


def test_where_the_kernel_does_not_apply_the_tensor_ops_run(cifar_root: Path, monkeypatch):
    train = load_cifar(cifar_root, split="train")
    images, labels = train.images[:512], train.labels[:512]
    pre = cifar_preprocess("per_pixel", images)
    kw = {"batch_size": 32, "preprocess": pre}
    for extra in (
        {"lighting": PCALighting.imagenet()},  # the colour shift between normalise and crop
        {"dtype": torch.float64},
        {"pad": 0, "flip": False},  # nothing to augment
    ):
        _, used = _batches(images, labels, True, monkeypatch, steps=1, **kw, **extra)
        assert used == [False], extra
    # images not contiguous (a channels_last uint8 set): the tensor ops
    _, used = _batches(images.contiguous(memory_format=torch.channels_last), labels, True,
                       monkeypatch, steps=1, **kw)  # fmt: skip
    assert used == [False]


def test_the_kernel_refuses_bad_arguments_with_one_line() -> None:
    ext = load_kernel()
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    rows = torch.arange(8).expand(2, 8).contiguous()
    stats = torch.ones(3, 8, 8)
    ok = (images, torch.tensor([0, 3]), rows, rows, stats, stats, 0)
    assert ext.crop_normalize(*ok).shape == (2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.crop_normalize(images, torch.tensor([0, 4]), *ok[2:])
    with pytest.raises(RuntimeError, match="uint8"):
        ext.crop_normalize(images.float(), *ok[1:])
    with pytest.raises(RuntimeError, match=r"\[3, H, W\]"):
        ext.crop_normalize(*ok[:4], torch.ones(3, 1, 1), stats, 0)
