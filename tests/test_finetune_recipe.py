"""`reslab train --data DIR --weights FILE --out RUN` on a folder of real images just works."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from reslab.cli import main
from reslab.data.preprocess import CIFAR10_MEAN, CIFAR10_STD
from reslab.data.split import stratified_split
from reslab.models import create_model
from reslab.models.weights import CIFAR10_CLASSES, save_safetensors

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def colour_folder(root: Path, per_class: int = 24) -> Path:
    """3 classes separable by colour: noisy 40x36 images, JPEG and PNG mixed."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(rgb, 35, size=(36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    return root


def cifar_weights(path: Path) -> Path:
    """A ResNet-20 written by reslab with CIFAR-10 metadata (32 px, per-channel statistics)."""
    torch.manual_seed(0)
    pre = {"kind": "cifar", "input_size": 32, "resize": None, "mode": "per_channel",
           "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}  # fmt: skip
    return save_safetensors(create_model("resnet20"), path, model_name="resnet20",
                            model_options={}, preprocess=pre, classes=list(CIFAR10_CLASSES))  # fmt: skip


def test_stratified_split_is_seeded_and_per_class() -> None:
    labels = [0] * 20 + [1] * 10 + [2] * 1
    tr, va = stratified_split(labels, fraction=0.2, seed=3)
    assert sorted(tr + va) == list(range(31))
    assert [sum(labels[i] == c for i in va) for c in range(3)] == [4, 2, 0]
    assert stratified_split(labels, fraction=0.2, seed=3) == (tr, va)
    assert stratified_split(labels, fraction=0.2, seed=4)[1] != va


def test_finetune_on_a_plain_folder_reaches_low_validation_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = colour_folder(tmp_path / "my_images")
    weights = cifar_weights(tmp_path / "resnet20.safetensors")
    out = tmp_path / "runs" / "x"
    argv = ["train", "--data", str(data), "--weights", str(weights), "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--epochs", "20"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "recipe finetune" in err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "resnet20"  # named by the weights
    assert cfg["image_size"] == 32 and cfg["resize"] == 37  # from the weights' 32 px
    assert cfg["normalization"] == "per_channel" and cfg["head_lr_mult"] == 10.0
    # The statistics the weights were trained with, recorded as used (CIFAR-10's, not ImageNet's).
    assert cfg["_run"]["preprocess"]["mean"] == pytest.approx(CIFAR10_MEAN)
    assert cfg["_run"]["preprocess"]["std"] == pytest.approx(CIFAR10_STD)
    assert cfg["batch_size"] == 32 <= 72 - 6
    assert cfg["iters"] == round(20 * 66 / 32)  # epochs over the 66 training images
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["preprocess"]["mean"] == pytest.approx(CIFAR10_MEAN)
    assert ckpt["classes"] == ["blue", "green", "red"]
    final = json.loads((out / "final.json").read_text())
    # 6 held-out images (2 per class): a colour-separable task must be learnt, at most 1 wrong.
    assert final["val_error"] <= 100 / 6 + 1e-6, final
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_error" in r for r in rows)


class _PidData(torch.utils.data.Dataset):
    """Labels each sample with the id of the process that loaded it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 4, 4, dtype=torch.uint8), os.getpid()


def test_folder_loader_keeps_its_workers_across_epochs() -> None:
    from reslab.data.loaders import FolderLoader
    from reslab.data.preprocess import Preprocess

    pre = Preprocess(kind="imagenet", input_size=4, mode="per_channel")
    loader = FolderLoader(_PidData(), batch_size=4, preprocess=pre, train=True,
                          device=torch.device("cpu"), workers=1, channels_last=False)  # fmt: skip
    pids = [{int(p) for _, y in loader for p in y} for _ in range(3)]
    assert len(pids[0]) == 1 and pids[0] != {os.getpid()}
    assert pids[0] == pids[1] == pids[2]  # the same worker process served every epoch


def test_watched_run_banner_timed_progress_loss_warning_and_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")  # in the dev extra; the run itself works without it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = colour_folder(tmp_path / "imgs")
    weights = cifar_weights(tmp_path / "w.safetensors")
    out = tmp_path / "run"
    # lr 3 blows the loss up within a few steps; no log/eval/save step falls inside the run, so
    # every steps.jsonl row but the last comes from the once-a-second clock.
    argv = ["train", "--data", str(data), "--weights", str(weights), "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--iters", "40", "--lr", "3",
            "--set", "schedule=step", "--set", "log_every=1000000",
            "--set", "eval_every=1000000", "--set", "save_every=1000000",
            # The blow-up must stay finite for 40 steps; calibrated on the eager BN ops, whose
            # rounding differs from the fused kernel's (with it the loss was nan by step 16).
            "--set", "fused_bn_act=false"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    for text in ("recipe finetune, new run", "66 training images, 3 classes; evaluated: val 6",
                 "40 iterations = 19.4 epochs at batch 32", "cpu, fp32", f"output     {out}"):  # fmt: skip
        assert text in err, err
    rows = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and rows[-1]["iter"] == 40
    assert [r["iter"] for r in rows] == sorted({r["iter"] for r in rows})
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [r["iter"] for r in rows]
    assert [e.value for e in acc.Scalars("eval/val_error")] == pytest.approx(
        [json.loads((out / "final.json").read_text())["val_error"]]
    )


def test_a_blowing_up_loss_is_warned_before_it_is_nan(tmp_path: Path, capsys) -> None:
    # Rows every 2 iterations (not on the clock), lr ramping up to 3 over 40 iterations, the
    # head at the same lr (at the recipe's x10 the head blew up within 2 iterations on Intel
    # AMX, before the watch had 3 sane rows): the loss is sane for the first rows, then jumps;
    # the warning must come while it is finite.
    data = colour_folder(tmp_path / "imgs", per_class=12)
    weights = cifar_weights(tmp_path / "w.safetensors")
    argv = ["train", "--data", str(data), "--weights", str(weights), "--out",
            str(tmp_path / "run"), "--device", "cpu", "--precision", "fp32", "--iters", "40",
            "--lr", "3", "--batch-size", "16", "--set", "schedule=step", "--set", "head_lr_mult=1",
            "--set", "warmup_iters=40", "--set", "log_every=2", "--set", "eval_every=1000000",
            "--set", "save_every=1000000"]  # fmt: skip
    main(argv)  # may end diverged (exit 2): the warning must have come first
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if ln.startswith("warning: loss")]
    assert warned and "running mean" in warned[0], err[-3000:]
    loss = float(warned[0].split()[2])
    assert math.isfinite(loss) and loss > 10


def test_run_without_tensorboard_says_so_once(tmp_path: Path, monkeypatch, capsys) -> None:
    from reslab.engine.run_log import RunLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    log = RunLog(tmp_path, resume_step=0)
    log.step({"iter": 1, "loss": 2.0})
    log.close()
    assert log.tb is None and "TensorBoard logging off" in capsys.readouterr().err
    (tmp_path / "steps.jsonl").write_text('{"iter": 1}\n{"iter": 5}\n{"it')  # torn by a kill
    RunLog(tmp_path, resume_step=3, tensorboard=False).close()
    assert (tmp_path / "steps.jsonl").read_text() == '{"iter": 1}\n'


def test_loss_watch_warns_once_per_tenfold_jump_and_clock_ticks_on_time() -> None:
    import time

    from reslab.engine.progress import Clock, LossWatch

    w = LossWatch()
    out = [w.update(v, step=i, lr=0.1) for i, v in enumerate([2.0, 1.5, 1.2, 1.0, 25.0, 30.0])]
    assert out[:4] == [None] * 4 and "25 at iteration 4" in out[4] and out[5] is None
    assert w.update(400.0, step=6, lr=0.1) is not None
    clock = Clock(0.05)
    assert not clock.due()
    time.sleep(0.06)
    assert clock.due() and not clock.due()


class _IndexData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 4, 4, dtype=torch.uint8), i


def test_persistent_workers_keep_the_order_resumable() -> None:
    from reslab.data.loaders import FolderLoader
    from reslab.data.preprocess import Preprocess

    def make() -> FolderLoader:
        pre = Preprocess(kind="imagenet", input_size=4, mode="per_channel")
        return FolderLoader(_IndexData(), batch_size=3, preprocess=pre, train=True, seed=5,
                            device=torch.device("cpu"), workers=1, channels_last=False)  # fmt: skip

    a = make()
    whole = [y.tolist() for _ in range(3) for _, y in a]  # 3 epochs of 3 batches
    b = make()
    seen = []
    for _, y in b:  # epoch 0, then stop after the second batch of epoch 1
        seen.append(y.tolist())
    it = iter(b)
    seen += [next(it)[1].tolist(), next(it)[1].tolist()]
    state = b.state_dict()
    c = make()
    c.load_state_dict(state)
    rest = [y.tolist() for _ in range(2) for _, y in c]
    assert seen + rest == whole
    assert whole[0] != whole[3]  # each epoch reshuffled


@pytest.mark.parametrize(
    ("name", "head"),
    [("resnet18", "fc"), ("resnet20", "fc"), ("plain20", "fc"), ("alexnet_cifar", "fc4"),
     ("alexnet", "fc8")],
)  # fmt: skip
def test_each_family_declares_its_classifier(name: str, head: str, tmp_path: Path) -> None:
    """One rule (models.classifier_name): head_lr_mult, freeze_backbone and the head re-init
    on fine-tuning all find fc in the ResNets, fc4 in AlexNet's CIFAR net and AlexNet's fc8."""
    from reslab.engine.config import TrainConfig
    from reslab.engine.schedules import make_sgd
    from reslab.engine.trainer import build_model
    from reslab.models.registry import classifier_name, get_classifier
    from reslab.models.weights import load_weights

    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    assert classifier_name(model) == head and get_classifier(model) is getattr(model, head)
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=0.0, head_lr_mult=10.0)
    fast = {id(p) for g in opt.param_groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert fast == {id(p) for p in getattr(model, head).parameters()}
    frozen, _ = build_model(TrainConfig(model=name, freeze_backbone=True), 10)
    trained = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trained == {f"{head}.weight", f"{head}.bias"}
    torch.save(model.state_dict(), tmp_path / "w.pt")
    new = create_model(name, num_classes=5)
    before = {n: t.clone() for n, t in new.state_dict().items()}
    load_weights(new, tmp_path / "w.pt", head="reinit")
    for n, t in new.state_dict().items():
        kept = n.startswith(head + ".")
        assert torch.equal(t, before[n] if kept else model.state_dict()[n]), n


def test_small_folder_fits_the_recipe_batch_but_refuses_a_chosen_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = colour_folder(tmp_path / "imgs", per_class=6)  # 18 images, 15 after the held-out 10%
    weights = cifar_weights(tmp_path / "w.safetensors")
    base = ["train", "--data", str(data), "--weights", str(weights), "--device", "cpu",
            "--precision", "fp32", "--iters", "2"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "fit")]) == 0
    err = capsys.readouterr().err
    assert "batch size 32 > 15 training images: using 15" in err
    assert yaml.safe_load((tmp_path / "fit" / "config.yaml").read_text())["batch_size"] == 15
    # The user's own batch size is never changed behind their back: refused with the numbers.
    assert main([*base, "--batch-size", "32", "--out", str(tmp_path / "own")]) == 2
    err = capsys.readouterr().err
    assert "15 images but one batch needs 32" in err and "Traceback" not in err
