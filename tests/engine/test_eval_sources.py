"""`reslab eval` on the other sources: an image folder through the data pipeline's evaluation
views, and a --model/--weights file in another project's format. These need reslab.data.folder
and reslab.models.weights (the data and use work); without them they skip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from reslab.cli import main
from reslab.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from reslab.engine.eval_run import run_eval
from reslab.models import create_model

PRE = {"kind": "imagenet", "input_size": 16, "resize": 18, "mode": "per_channel",
       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}  # fmt: skip


def _folder(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for k, cls in enumerate(["apple", "boat"]):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            h, w = 20 + 4 * i, 26 - 3 * i  # assorted sizes and aspect ratios
            px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
            px[..., k] = px[..., k] // 2 + 128  # a colour cast per class
            Image.fromarray(px.numpy()).save(root / cls / f"img{i}.{['png', 'jpg'][i % 2]}")
    return root


def _checkpoint(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=2).eval()
    torch.save({"format": "reslab", "version": 1, "model_name": "resnet20",
                "model_options": {"num_classes": 2}, "model": model.state_dict(),
                "preprocess": PRE, "classes": ["apple", "boat"], "step": 0, "config": {}},
               path)  # fmt: skip
    return model


def test_folder_center_ten_crop_multi_scale(tmp_path: Path) -> None:
    pytest.importorskip("reslab.data.folder")
    from reslab.data import transforms as T
    from reslab.data.images import load_image

    root = _folder(tmp_path / "imgs")
    model = _checkpoint(tmp_path / "m.pt")
    pre = Preprocess.from_dict(PRE)
    files = sorted((root / c / f, k) for k, c in enumerate(["apple", "boat"])
                   for f in sorted(p.name for p in (root / c).iterdir()))  # fmt: skip
    views = {
        "center": lambda im: [T.center_crop_transform(resize=18, crop_size=16)(im)[None]],
        "ten-crop": lambda im: [T.ten_crop_transform(resize=18, crop_size=16)(im)],
        "multi-scale": lambda im: T.multiscale_views(im, shorter_sides=(16, 22)),
    }
    for name, make in views.items():
        nll, correct = 0.0, 0
        with torch.no_grad():
            for path, label in files:
                probs = [model(pre.normalize(v)).softmax(1) for v in make(load_image(path))]
                p = torch.cat(probs).mean(0)
                nll -= math.log(p[label].item())
                correct += int(p.argmax().item() == label)
        result, _, classes = run_eval(checkpoints=[tmp_path / "m.pt"], data=root,
                                      dataset="folder", views=name, scales=(16, 22),
                                      device="cpu", batch_size=4, workers=0)  # fmt: skip
        r = result.ensemble
        assert classes == ["apple", "boat"] and r.num_samples == 4
        assert r.top1_error == pytest.approx(100 * (1 - correct / 4))
        assert r.loss == pytest.approx(nll / 4, rel=1e-4), name
    out = tmp_path / "o"
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(root),
                 "--dataset", "folder", "--out", str(out),
                 "--workers", "0"]) == 0  # fmt: skip
    assert json.loads((out / "eval.json").read_text())["members"][0]["num_samples"] == 4


def test_model_weights_of_the_cifar_project(cifar_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("reslab.models.weights")
    from reslab.data.cifar import load_cifar

    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    sd = {"module." + k.replace("fc.", "linear."): v for k, v in model.state_dict().items()}
    th = tmp_path / "resnet20.th"
    torch.save({"state_dict": sd, "best_prec1": 10.0}, th)
    out = tmp_path / "o"
    assert main(["eval", "--model", "resnet20", "--weights", str(th), "--data",
                 str(cifar_root), "--limit", "100", "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads((out / "eval.json").read_text())
    test = load_cifar(cifar_root, split="test")
    # That project normalises with ImageNet's per-channel statistics: recorded, not flagged.
    x = (
        test.images[:100].float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        pred = model(x).argmax(1)
    want = 100 * (1 - (pred == test.labels[:100]).double().mean().item())
    assert doc["members"][0]["top1_error"] == pytest.approx(want)


def test_a_cifar_net_is_shown_the_same_crop_by_eval_and_predict(tmp_path: Path) -> None:
    """A CIFAR net's stored preprocessing has no resize: eval (centre view) and predict both
    shrink the whole image to 32, and multi-scale defaults to the CIFAR sides (32, 40, 48)."""
    from reslab.data.images import load_image
    from reslab.engine.eval_run import folder_batches
    from reslab.models.weights import CIFAR10_PROJECT_PREPROCESS
    from reslab.predict import fit_to_input

    root = _folder(tmp_path / "imgs")
    pre = Preprocess.from_dict(dict(CIFAR10_PROJECT_PREPROCESS))
    assert pre.test_resize == 32 and Preprocess.from_dict(PRE).test_resize == 18
    batches, classes = folder_batches(root, pre=pre, views="center", scales=None,
                                      labels_file=None, classes=None, limit=None, batch_size=4,
                                      workers=0)  # fmt: skip
    x, _ = next(iter(batches))
    paths = [root / c / f for c in classes for f in sorted(p.name for p in (root / c).iterdir())]
    want = torch.stack([fit_to_input(load_image(p), pre) for p in paths])
    assert torch.equal(x, want)
    multi, _ = folder_batches(root, pre=pre, views="multi-scale", scales=None, labels_file=None,
                              classes=None, limit=None, batch_size=4, workers=0)  # fmt: skip
    views, _ = next(iter(multi))
    assert [min(v.shape[-2:]) for v in views] == [32, 40, 48]
