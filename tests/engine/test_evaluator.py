"""Evaluator: exact counts on hand-made scores, view and ensemble averaging, distributed sums."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reslab.data import transforms as T
from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import Preprocess
from reslab.engine import evaluator
from reslab.engine.evaluator import evaluate, evaluate_ensemble
from reslab.engine.views import flip, flip_shift, make_views, multi_scale, ten_crop


class Logits(nn.Module):
    """Returns its input as the logits: [B, C] or [B, C, 1, 1] -> [B, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_exact_top1_top5_confusion_loss() -> None:
    # 6 classes; each row ranks the classes; the label sits at a chosen rank.
    logits = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1],  # label 0: rank 1 -> top-1 and top-5 hit
            [1.0, 6, 5, 4, 3, 2],  # label 3: rank 4 -> top-5 hit only, predicted 1
            [6.0, 5, 4, 3, 2, 1],  # label 5: rank 6 -> miss both, predicted 0
            [1.0, 2, 3, 4, 5, 6],  # label 5: rank 1 -> hit
            [1.0, 2, 6, 4, 5, 3],  # label 0: rank 6 -> miss both, predicted 2
        ]
    )
    labels = torch.tensor([0, 3, 5, 5, 0])
    r = evaluate(Logits(), _batches(logits, labels, 2), device="cpu", num_classes=6)
    # uint8 labels count the same (gather had refused them: helper audit C, M4)
    r8 = evaluate(Logits(), _batches(logits, labels.to(torch.uint8), 2), device="cpu",
                  num_classes=6)  # fmt: skip
    assert torch.equal(r8.confusion, r.confusion) and r8.loss == r.loss
    assert r.num_samples == 5
    assert r.top1_error == pytest.approx(60.0)
    assert r.top5_error == pytest.approx(40.0)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    for t, p in [(0, 0), (3, 1), (5, 0), (5, 5), (0, 2)]:
        expected[t, p] += 1
    assert torch.equal(r.confusion, expected)
    acc = r.per_class_accuracy
    assert acc[0] == 50 and acc[3] == 0 and acc[5] == 50
    assert all(math.isnan(acc[c]) for c in (1, 2, 4))  # no samples of classes 1, 2, 4
    nll = [-math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))
           for row, t in zip(logits.tolist(), labels.tolist())]  # fmt: skip
    assert r.loss == pytest.approx(sum(nll) / 5, rel=1e-6)
    d = r.to_dict(["a", "b", "c", "d", "e", "f"])
    assert d["per_class_accuracy"]["b"] is None and d["confusion"][5] == [1, 0, 0, 0, 0, 1]


# Softmax averaging and logit averaging disagree here: view A is sure of class 0, view B leans to
# 1; mean probs [0.455, 0.275, 0.27] -> 0, mean log-probs -> 1.
VIEW_A, VIEW_B = [0.9, 0.05, 0.05], [0.01, 0.5, 0.49]


def test_views_average_softmax_not_logits() -> None:
    a, b = torch.tensor([VIEW_A]).log(), torch.tensor([VIEW_B]).log()
    y = torch.tensor([0])
    stacked = torch.stack([a, b], 1)[..., None, None]  # [B=1, V=2, C=3, 1, 1]
    for views, x in [("ten-crop", stacked), ("multi-scale", [a, b])]:
        r = evaluate(Logits(), [(x, y)], device="cpu", num_classes=3, views=views)
        assert r.top1_error == 0.0 and r.confusion[0, 0] == 1
        expected = -math.log((VIEW_A[0] + VIEW_B[0]) / 2)
        assert r.loss == pytest.approx(expected, rel=1e-6)
    assert (a + b).argmax() == 1  # the logit mean would have been wrong


def test_ensemble_is_mean_of_member_softmax() -> None:
    # raw x [B, 2, C]: member i sees x[:, i] through its normaliser.
    x = torch.stack([torch.tensor([VIEW_A, VIEW_A]), torch.tensor([VIEW_B, VIEW_A])], 1).log()
    y = torch.tensor([0, 1])
    res = evaluate_ensemble(
        [Logits(), Logits()],
        [(x, y)],
        device="cpu",
        num_classes=3,
        normalizers=[lambda t: t[:, 0], lambda t: t[:, 1]],
        names=["a", "b"],
    )
    # member a predicts 0, 0; member b predicts 1, 0; ensemble: sample 0 -> 0, sample 1 -> 0.
    assert [m.top1_error for m in res.members] == [50.0, 100.0]
    assert res.ensemble.top1_error == 50.0 and res.ensemble.name == "ensemble"
    assert res.ensemble.confusion.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    p0 = [(u + v) / 2 for u, v in zip(VIEW_A, VIEW_B)]
    p1 = VIEW_A  # both members gave VIEW_A to sample 1
    assert res.ensemble.loss == pytest.approx(-(math.log(p0[0]) + math.log(p1[1])) / 2, rel=1e-6)


def test_ten_crop_and_multi_scale_views_exact() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    v = ten_crop(x, size=4)
    assert v.shape == (2, 10, 3, 4, 4)
    starts = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for k, (i, j) in enumerate(starts):
        assert torch.equal(v[:, k], x[:, :, i : i + 4, j : j + 4])
        assert torch.equal(v[:, k + 5], x[:, :, i : i + 4, j : j + 4].flip(-1))
    # CIFAR case: 32px crops of a 32px image come from the 4-pixel zero padding.
    c = ten_crop(torch.ones(1, 3, 32, 32))
    assert c.shape == (1, 10, 3, 32, 32)
    assert torch.equal(c[0, 4], torch.ones(3, 32, 32))  # the centre crop is the image
    assert c[0, 0, :, :4, :].abs().sum() == 0 and c[0, 0, :, 4:, 4:].min() == 1
    # Odd margins: the device views and the folder transform pick the same centre (rounded).
    odd = torch.arange(3 * 7 * 7, dtype=torch.float32).view(1, 3, 7, 7)
    assert torch.equal(ten_crop(odd, size=4), T.ten_crop(odd, size=4))
    assert torch.equal(ten_crop(odd, size=4)[0, 4], odd[0, :, 2:6, 2:6])
    scales = multi_scale(x, scales=[6, 8, 3])
    assert [tuple(s.shape) for s in scales] == [(2, 3, 6, 6), (2, 3, 8, 8), (2, 3, 3, 3)]
    assert scales[0] is x
    assert make_views(x, "center") is x and isinstance(make_views(x, "multi-scale"), list)
    with pytest.raises(ValueError, match="views must be one of"):
        make_views(x, "five-crop")


def test_flip_view_and_chunked_forward_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    v = make_views(x, "flip")
    assert v.shape == (2, 2, 3, 4, 5) and torch.equal(v[:, 0], x)
    assert torch.equal(v[:, 1], x[..., torch.arange(4, -1, -1)]) and torch.equal(flip(x), v)
    # A real net, images + mirrors averaged; split into chunks of 3 images (channels_last model):
    # the same scores as one pass over all of them.
    torch.manual_seed(0)
    from reslab.models import create_model

    net = create_model("resnet20").eval()
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,))
    whole = evaluate(net, [(images, labels)], device="cpu", views="flip")
    monkeypatch.setattr(evaluator, "FORWARD_CHUNK", 3)
    net_cl = net.to(memory_format=torch.channels_last)
    parts = evaluate(net_cl, [(images, labels)], device="cpu", views="flip")
    assert torch.equal(whole.confusion, parts.confusion)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-5)
    with torch.no_grad():
        mean = (net(images).softmax(1) + net(images.flip(-1)).softmax(1)) / 2
    nll = -mean.gather(1, labels[:, None]).log().mean().item()
    assert whole.loss == pytest.approx(nll, rel=1e-5)


def test_forward_passes_hold_at_most_forward_elements_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 32x32 images keep FORWARD_CHUNK; 224px ones 2^24 // 150528 = 111 a pass (a 256-image
    # pass had put the stem's 411 MB bf16 output over glibc's mmap threshold); a huge image 1.
    chunk = evaluator.forward_chunk
    assert chunk(torch.empty(500, 3, 32, 32)) == evaluator.FORWARD_CHUNK == 256
    assert chunk(torch.empty(320, 3, 224, 224)) == 111
    assert chunk(torch.empty(2, 3, 4096, 4096)) == 1 and chunk(torch.empty(0, 3, 8, 8)) == 256
    assert chunk(torch.empty(320, 3, 224, 224, device="meta")) == 256  # a GPU has no such cliff
    # A ten-crop-like batch of 7 images x 2 views at 3 images a pass: 5 passes, the same scores.
    torch.manual_seed(0)
    from reslab.models import create_model

    net = create_model("resnet20").eval()
    images, labels = torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,))
    whole = evaluate(net, [(images, labels)], device="cpu", views="flip")
    passes: list[int] = []
    handle = net.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
    monkeypatch.setattr(evaluator, "FORWARD_ELEMENTS", 3 * 3 * 32 * 32 + 5)
    parts = evaluate(net, [(images, labels)], device="cpu", views="flip")
    handle.remove()
    assert passes == [3, 3, 3, 3, 2]
    assert torch.equal(whole.confusion, parts.confusion)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-5)


def test_flip_shift_views_exact_and_averaged_equally() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) + 1  # no zeros inside
    v = make_views(x, "flip-shift")
    assert v.shape == (2, 6, 3, 4, 5) and torch.equal(flip_shift(x), v)
    moved = torch.zeros(2, 2, 3, 4, 5)
    moved[:, 0, :, 1:, 1:] = x[:, :, :-1, :-1]  # down-right: out[i, j] = x[i - 1, j - 1]
    moved[:, 1, :, :-1, :-1] = x[:, :, 1:, 1:]  # up-left: out[i, j] = x[i + 1, j + 1]
    assert torch.equal(v[:, 0], x) and torch.equal(v[:, 1:3], moved)
    assert torch.equal(v[:, 3:], torch.stack((x, moved[:, 0], moved[:, 1]), 1).flip(-1))
    # The edge a moved view leaves is zero (the mean colour of a normalised batch), one pixel wide.
    assert v[:, 1, :, 0].abs().sum() == 0 and v[:, 1, :, :, 0].abs().sum() == 0
    assert v[:, 1, :, 1:, 1:].min() >= 1 and v[:, 2, :, -1].abs().sum() == 0
    two = flip_shift(x, shift=2)
    assert torch.equal(two[:, 1, :, 2:, 2:], x[:, :, :-2, :-2]) and two[:, 1, :, :2].sum() == 0
    with pytest.raises(ValueError, match="shift must be at least 1"):
        flip_shift(x, shift=0)
    # evaluate() averages the six views' softmax with equal weights.
    torch.manual_seed(0)
    from reslab.models import create_model

    net = create_model("resnet20").eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    res = evaluate(net, [(images, labels)], device="cpu", views="flip-shift")
    with torch.no_grad():
        mean = torch.stack([net(flip_shift(images)[:, k]).softmax(1) for k in range(6)]).mean(0)
    nll = -mean.gather(1, labels[:, None]).log().mean().item()
    assert res.loss == pytest.approx(nll, rel=1e-5)
    assert res.top1_error == pytest.approx(100.0 * (mean.argmax(1) != labels).double().mean())
    flip_only = evaluate(net, [(images, labels)], device="cpu", views="flip")
    assert flip_only.loss != pytest.approx(res.loss, rel=1e-6)  # the moved views count


def test_bf16_matches_fp32_on_clear_margins() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 0.1
    labels = torch.randint(0, 10, (64,))
    logits[torch.arange(64), (labels + torch.arange(64) % 2) % 10] += 5.0  # half right
    f = evaluate(Logits(), _batches(logits, labels, 16), device="cpu", num_classes=10)
    b = evaluate(
        Logits(), _batches(logits, labels, 16), device="cpu", num_classes=10, precision="bf16"
    )
    assert f.top1_error == b.top1_error == 50.0 and torch.equal(f.confusion, b.confusion)


def test_bad_labels_and_wrong_class_count_are_clear_errors() -> None:
    x, y = torch.zeros(3, 4), torch.tensor([0, 4, 1])
    with pytest.raises(ValueError, match=r"1 labels lie outside 0\.\.3"):
        evaluate(Logits(), [(x, y)], device="cpu", num_classes=4)
    with pytest.raises(ValueError, match=r"outputs .* 10 classes"):
        evaluate(Logits(), [(x, torch.tensor([0, 1, 2]))], device="cpu", num_classes=10)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(Logits(), [], device="cpu", num_classes=4)


def _tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (101, 3, 8, 8), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, 5, (101,), generator=g)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        images, labels = _data()
        loader = TensorLoader(images, labels, batch_size=20, preprocess=Preprocess(),
                              train=False, rank=rank, world_size=world, channels_last=False)  # fmt: skip
        r = evaluate(_tiny_net(), loader, device="cpu", num_classes=5)
        torch.save({"top1": r.top1_error, "top5": r.top5_error, "n": r.num_samples,
                    "confusion": r.confusion, "loss": r.loss}, f"{out}.{rank}")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_report_what_one_does(tmp_path: Path) -> None:
    images, labels = _data()
    loader = TensorLoader(images, labels, batch_size=20, preprocess=Preprocess(), train=False,
                          channels_last=False)  # fmt: skip
    one = evaluate(_tiny_net(), loader, device="cpu", num_classes=5)
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["n"] == 101  # 51 + 50 samples, summed over ranks
        assert torch.equal(got["confusion"], one.confusion)
        assert got["top1"] == one.top1_error and got["top5"] == one.top5_error
        assert got["loss"] == pytest.approx(one.loss, rel=1e-9)


def test_an_image_folder_loader_is_evaluated_with_a_preprocess_and_refused_raw(tmp_path) -> None:
    """The README's way: ImageFolder + center_crop_transform gives uint8 batches; a Preprocess
    (or any callable) normalises them, as `reslab eval` does; without one the uint8 batch is
    refused in one sentence instead of a dtype error from inside the first convolution."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from reslab.data.folder import ImageFolder
    from reslab.data.preprocess import Preprocess
    from reslab.data.transforms import center_crop_transform
    from reslab.models import create_model

    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            px = g.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(px).save(tmp_path / c / f"{i}.png")
    loader = DataLoader(ImageFolder(tmp_path, transform=center_crop_transform(resize=36,
                                                                              crop_size=32)),
                        batch_size=4)  # fmt: skip
    model = create_model("resnet20", num_classes=2)
    pre = Preprocess(kind="imagenet", input_size=32, resize=36)
    r = evaluate(model, loader, device="cpu", num_classes=2, normalize=pre)
    want = evaluate(model, loader, device="cpu", num_classes=2, normalize=pre.normalize)
    assert r.num_samples == 6 and r.top1_error == want.top1_error and r.loss == want.loss
    # a checkpoint's `preprocess` (and WeightsInfo.preprocess) is the dict it stores: it had
    # failed deep inside with "'dict' object is not callable"
    stored = evaluate(model, loader, device="cpu", num_classes=2, normalize=pre.to_dict())
    assert stored.top1_error == r.top1_error and stored.loss == r.loss
    with pytest.raises(TypeError, match="normalize must be a callable, a Preprocess"):
        evaluate(model, loader, device="cpu", num_classes=2, normalize="imagenet")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the loader gives uint8 images: pass normalize="):
        evaluate(model, loader, device="cpu", num_classes=2)

    class OwnNormalisation(nn.Module):  # takes uint8 itself: must still be evaluated
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model(pre.normalize(x))

    own = evaluate(OwnNormalisation(), loader, device="cpu", num_classes=2)
    assert own.top1_error == r.top1_error and own.num_samples == 6


def test_a_loader_refuses_labels_that_do_not_match_and_a_zero_batch() -> None:
    """50 images with 40 labels had trained on 40 silently; batch 0 and channels-last images
    were taken too (helper audit C, M5)."""
    images = torch.zeros(50, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="50 images but 40 labels"):
        TensorLoader(images, torch.zeros(40, dtype=torch.long), batch_size=10,
                     preprocess=Preprocess(), train=False)  # fmt: skip
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        TensorLoader(images, torch.zeros(50, dtype=torch.long), batch_size=0,
                     preprocess=Preprocess(), train=False)  # fmt: skip
    with pytest.raises(ValueError, match="channels last"):
        TensorLoader(images.permute(0, 2, 3, 1).contiguous(), torch.zeros(50, dtype=torch.long),
                     batch_size=10, preprocess=Preprocess(), train=False)  # fmt: skip
