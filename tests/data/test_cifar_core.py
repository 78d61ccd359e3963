"""The on-device CIFAR path: reader, splits, mean image, batched augmentation, exact resume."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab.data.cifar import DataError, load_cifar, mean_image, split_indices
from reslab.data.loaders import TensorLoader, _generator, pad_crop_flip
from reslab.data.preprocess import Preprocess


def test_real_cifar10_splits_and_mean(cifar_root: Path) -> None:
    train = load_cifar(cifar_root, split="train")
    test = load_cifar(cifar_root, split="test")
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    a, b = load_cifar(cifar_root, split="train45k"), load_cifar(cifar_root, split="val5k")
    assert len(a.labels) == 45000 and len(b.labels) == 5000
    means = mean_image(train.images).mean((1, 2))
    torch.testing.assert_close(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-4, rtol=0)


def test_split_is_fixed_and_disjoint() -> None:
    t1, v1 = split_indices(50000)
    t2, v2 = split_indices(50000)
    assert torch.equal(t1, t2) and torch.equal(v1, v2)
    assert len(set(t1.tolist()) & set(v1.tolist())) == 0 and len(t1) + len(v1) == 50000


def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)


def test_bad_cifar_files_name_the_file(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with pytest.raises(DataError, match="reslab data download "):
        load_cifar(tmp_path, split="test")
    for names in (5, ["a", "b", "c"]):  # the model's classes come from here: checked
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({"label_names": names}, f)
        _write_batch(d / "test_batch", np.zeros((4, 3072), np.uint8), [0, 1, 2, 7])
        with pytest.raises(DataError, match=r"batches\.meta: expected 10 class names"):
            load_cifar(tmp_path, split="test")
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    _write_batch(d / "test_batch", np.zeros((4, 3000), np.uint8), [0, 1, 2, 3])
    with pytest.raises(DataError, match=r"test_batch.*3072"):
        load_cifar(tmp_path, split="test")
    sub = tmp_path / "b"
    (sub / "cifar-10-batches-py").mkdir(parents=True)
    (sub / "cifar-10-batches-py" / "batches.meta").write_bytes((d / "batches.meta").read_bytes())
    _write_batch(sub / "cifar-10-batches-py" / "test_batch", np.zeros((2, 3072), np.uint8), [0, 10])
    with pytest.raises(DataError, match=r"labels span 0\.\.10"):
        load_cifar(sub, split="test")
    (sub / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04trunc")
    from reslab.data.cifar import _load_cached

    _load_cached.cache_clear()
    with pytest.raises(DataError, match="cannot be read"):
        load_cifar(sub, split="test")


def test_pad_crop_flip_is_a_shifted_window() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    g = _generator(torch.device("cpu"), 1)
    y = pad_crop_flip(x, pad=2, flip=True, generator=g)
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(
            torch.equal(y[i], w) or torch.equal(y[i], w.flip(-1))
            for w in (xp[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5))
        )
        assert found


def test_loader_resume_is_exact_and_shards_match_one_process() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)
    pre = Preprocess()

    def make(**kw):
        return TensorLoader(images, labels, batch_size=8, preprocess=pre, train=True, seed=3, **kw)

    full = make()
    ref = [b for _ in range(2) for b in full]  # two epochs, 5 batches each
    part = make()
    it = iter(part)
    first = [next(it) for _ in range(3)]
    state = part.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    got = first + rest
    assert len(got) == len(ref) == 10
    for (x1, y1), (x2, y2) in zip(got, ref, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # two ranks' shares of each global batch, concatenated, are the one-process batch's labels
    r0, r1 = make(rank=0, world_size=2), make(rank=1, world_size=2)
    for (_, y0), (_, y1), (_, y) in zip(r0, r1, ref[:5], strict=True):
        assert torch.equal(torch.cat([y0, y1]), y)


def test_training_batches_are_the_epoch_orders_images() -> None:
    # Without pad/crop/flip a batch is exactly the normalised images and labels at its slice of
    # the epoch's permutation (the loader takes them with index_select, not advanced indexing).
    torch.manual_seed(1)
    images = torch.randint(0, 256, (30, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 10, (30,))
    pre = Preprocess()
    ld = TensorLoader(images, labels, batch_size=7, preprocess=pre, train=True, seed=5, pad=0,
                      flip=False)  # fmt: skip
    order = ld.epoch_order()
    batches = list(ld)
    assert len(batches) == 4
    for s, (x, y) in enumerate(batches):
        sel = order[7 * s : 7 * s + 7]
        assert torch.equal(x, pre.normalize(images[sel])) and torch.equal(y, labels[sel])


def test_eval_loader_covers_every_sample_once_across_ranks() -> None:
    images = torch.zeros(23, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(23)
    seen = []
    for r in range(3):
        ld = TensorLoader(images, labels, batch_size=6, preprocess=Preprocess(), train=False,
                          rank=r, world_size=3)  # fmt: skip
        seen += [y for _, y in ld]
    assert sorted(torch.cat(seen).tolist()) == list(range(23))


def test_preprocess_roundtrip_and_uint8_equals_float() -> None:
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    p = Preprocess(mode="per_pixel", mean=torch.rand(3, 32, 32), std=[1.0, 1.0, 1.0])
    q = Preprocess.from_dict(p.to_dict())
    torch.testing.assert_close(q.normalize(img), p.normalize(img.float() / 255))


def test_alternate_flip_mirrors_each_image_every_other_epoch() -> None:
    torch.manual_seed(0)
    n = 64
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(n)

    def make(**kw):
        return TensorLoader(images, labels, batch_size=16, preprocess=Preprocess(), train=True,
                            seed=5, pad=0, alternate_flip=True, **kw)  # fmt: skip

    pre = Preprocess()
    plain = pre.normalize(images)

    def mirrored(loader, epochs: int) -> torch.Tensor:
        seen = torch.zeros(epochs, n, dtype=torch.int64)  # 1 = mirror, 0 = as stored
        for e in range(epochs):
            for x, y in loader:
                for xi, yi in zip(x, y):
                    same, flip = torch.equal(xi, plain[yi]), torch.equal(xi, plain[yi].flip(-1))
                    assert same != flip  # random pixels: never symmetric
                    seen[e, yi] = int(flip)
        return seen

    seen = mirrored(make(), 4)
    assert 16 <= int(seen[0].sum()) <= 48  # a random half in epoch 0
    assert torch.equal(seen[1], 1 - seen[0]) and torch.equal(seen[2], seen[0])
    assert torch.equal(seen[3], seen[1])
    # a resumed run and two ranks see the same orientation as one uninterrupted process
    part = make()
    it = iter(part)
    [next(it) for _ in range(4)]
    assert next(it, None) is None  # epoch 0 done: the state now points at epoch 1
    resumed = make()
    resumed.load_state_dict(part.state_dict())
    assert torch.equal(mirrored(resumed, 1)[0], seen[1])
    r0, r1 = make(rank=0, world_size=2), make(rank=1, world_size=2)
    for (x0, _), (x1, _), (x, _) in zip(r0, r1, make(), strict=True):
        assert torch.equal(torch.cat([x0, x1]), x)
    # off (the paper's coin per image) draws afresh: some image keeps its orientation
    coin = TensorLoader(images, labels, batch_size=16, preprocess=pre, train=True, seed=5, pad=0)
    both = mirrored(coin, 2)
    assert bool((both[0] == both[1]).any())


def test_progressive_resize_shrinks_the_first_iterations_and_resumes_exactly() -> None:
    """small_size: the first small_iters batches (counted across epochs) are the full-size
    augmented batches downsampled; later ones are full size; a resumed loader agrees."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(64)

    def make(**kw):
        return TensorLoader(images, labels, batch_size=16, preprocess=Preprocess(), train=True,
                            seed=3, pad=2, **kw)  # fmt: skip

    full, small = make(), make(small_size=4, small_iters=6)  # 4 batches per epoch
    got = [b for _ in range(2) for b in small]
    ref = [b for _ in range(2) for b in full]
    assert [tuple(x.shape[-2:]) for x, _ in got] == [(4, 4)] * 6 + [(8, 8)] * 2
    for i, ((x, y), (xr, yr)) in enumerate(zip(got, ref, strict=True)):
        assert torch.equal(y, yr)
        want = xr if i >= 6 else F.interpolate(xr, size=(4, 4), mode="bilinear", antialias=True)
        torch.testing.assert_close(x, want)
    part = make(small_size=4, small_iters=6)
    it = iter(part)
    next(it)  # epoch 0, one batch handed out
    resumed = make(small_size=4, small_iters=6)
    resumed.load_state_dict(part.state_dict())
    again = list(resumed) + list(resumed)
    assert len(again) == 7
    for (x, _), (xg, _) in zip(again, got[1:], strict=True):
        assert torch.equal(x, xg)
