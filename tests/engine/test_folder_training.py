"""Training on a user's own image folder: real JPEG/PNG files made with PIL, decoded for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.data.cifar import DataError
from reslab.engine.config import TrainConfig
from reslab.engine.trainer import train
from reslab.runtime.checkpoint import load_checkpoint

COLOURS = ((220, 30, 30), (30, 220, 30), (30, 30, 220))  # one solid colour per class


def make_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """Images of one solid colour per class (plus a little noise): any net that learns at all
    separates them. Some training images are greyscale PNGs (still apart by brightness)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(70, 120, size=2)
                noise = rng.integers(0, 20, size=(h, w, 3), dtype=np.uint8)
                img = Image.fromarray(np.array(COLOURS[c], np.uint8) + noise)
                if i % 2:
                    img.save(d / f"{i}.jpg", quality=90)
                else:
                    grey = i % 3 == 0 and split == "train"
                    img.convert("L" if grey else "RGB").save(d / f"{i}.png")
    (root / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


@pytest.mark.parametrize("augment", ["imagenet", "alexnet"])
def test_train_on_image_folder(tmp_path: Path, augment: str) -> None:
    data = make_folder(tmp_path / "imgs")
    cfg = TrainConfig(
        model="alexnet_cifar", dataset="folder", data=str(data), out=str(tmp_path / "run"),
        folder_augment=augment, pca_lighting=True, image_size=32, resize=36, batch_size=6,
        iters=10, eval_every=10, save_every=10, log_every=2, workers=0, device="cpu",
        eval_splits=["val"], val_split=False, milestones=[], lr=0.01,
    )  # fmt: skip
    final = train(cfg, progress=False)
    assert final["val_error"] == 0.0  # all 6 validation images of the separable classes
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"]
    assert ckpt["model_options"]["num_classes"] == 3
    assert ckpt["preprocess"]["kind"] == "imagenet" and ckpt["preprocess"]["input_size"] == 32
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["iter"] == 10 and row["val_error"] == 0.0


def test_classes_beside_val_the_readme_layout(tmp_path: Path) -> None:
    """DIR/CLASS/* with DIR/val/CLASS/* (no DIR/train): val/ is the validation set, not a class
    whose images would be trained on."""
    data = make_folder(tmp_path / "imgs")
    for d in (data / "train").iterdir():
        d.rename(data / d.name)
    (data / "train").rmdir()
    cfg = TrainConfig(
        model="resnet20", dataset="folder", data=str(data), out=str(tmp_path / "run"),
        image_size=32, resize=36, batch_size=6, iters=2, eval_every=2, save_every=2, log_every=1,
        workers=0, device="cpu", eval_splits=["val"], val_split=False, milestones=[],
    )  # fmt: skip
    train(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["classes"] == ["class_0", "class_1", "class_2"]  # no "val" class
    assert ckpt["model_options"]["num_classes"] == 3


def test_a_run_inside_its_image_folder_is_refused(tmp_path: Path) -> None:
    from reslab.engine.rundir import RunDirError

    data = make_folder(tmp_path / "imgs")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data, data / "train" / "runs"):
        cfg = TrainConfig(model="resnet20", dataset="folder", data=str(data), out=str(out),
                          image_size=32, resize=36, batch_size=6, iters=1, workers=0,
                          device="cpu")  # fmt: skip
        with pytest.raises(RunDirError, match="inside the image folder"):
            train(cfg, progress=False)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_fine_tune_restarts_resumes_without_its_weights_and_refuses_changed_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The finetune recipe leaves image size and resize open: a torchrun restart (the same
    command line again) must resolve them to the stored values and resume; a resume needs no
    initial weights file (the checkpoint holds every weight); and a class folder renamed since
    the start is refused, never trained as another class's output."""
    import shutil

    import reslab
    from reslab.cli import main
    from reslab.models.weights import CIFAR10_CLASSES, CIFAR10_PROJECT_PREPROCESS, save_safetensors

    data = make_folder(tmp_path / "imgs")
    init = save_safetensors(reslab.create_model("resnet20"), tmp_path / "init.safetensors",
                            model_name="resnet20", model_options={},
                            preprocess=CIFAR10_PROJECT_PREPROCESS, classes=CIFAR10_CLASSES)  # fmt: skip
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--weights", str(init), "--out", str(run), "--iters",
            "4", "--save-every", "2", "--eval-every", "100", "--workers", "0", "--device", "cpu",
            "--precision", "fp32"]  # fmt: skip
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert main(argv) == 0
    first = load_checkpoint(run / "last.pt")
    assert first["config"]["image_size"] == 32 and first["config"]["resize"] == 37
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun runs the same argv again
    assert main(argv) == 0
    assert "torchrun restart 1: resuming" in capsys.readouterr().err
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    init.unlink()
    resume = ["train", "--out", str(run), "--resume", "--workers", "0", "--device", "cpu"]
    assert main([*resume, "--iters", "6"]) == 0, capsys.readouterr().err
    after = load_checkpoint(run / "last.pt")
    assert after["step"] == 6 and after["model_options"] == first["model_options"]
    shutil.move(data / "train" / "class_1", data / "train" / "zebra")
    shutil.move(data / "val" / "class_1", data / "val" / "zebra")
    assert main([*resume, "--iters", "8"]) == 2
    err = capsys.readouterr().err
    assert "trained on 3 classes" in err and "gone: class_1; new: zebra" in err
    assert load_checkpoint(run / "last.pt")["step"] == 6


def test_folders_outside_the_known_classes_are_refused_not_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An evaluation folder with a class folder the model does not know (plane/ for airplane/),
    or a val/ class without a training class, would be scored on the rest without a word."""
    import shutil

    from reslab.cli import main

    data = make_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    cfg = TrainConfig(
        model="resnet20", dataset="folder", data=str(data), out=str(run), image_size=32,
        resize=36, batch_size=6, iters=2, eval_every=2, save_every=2, workers=0, device="cpu",
        eval_splits=["val"], val_split=False, milestones=[],
    )  # fmt: skip
    train(cfg, progress=False)
    other = tmp_path / "other"
    shutil.copytree(data / "val", other)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--dataset", "folder",
                 "--data", str(other)]) == 0  # fmt: skip
    with_flag = capsys.readouterr().out
    # Without --dataset the checkpoint's own run says it trained on a folder (it had looked for
    # CIFAR in the folder and advised `reslab data download` into it).
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(other)]) == 0
    without = capsys.readouterr().out
    assert without.startswith("folder test") and without == with_flag
    # The training layout itself (train/ + val/): its validation set is what eval scores.
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(data)]) == 0
    layout = capsys.readouterr()
    assert f"{data / 'val'} (the validation set of {data})" in layout.err
    assert layout.out.split("| 6 |")[0] == with_flag.split("| 6 |")[0]
    with pytest.MonkeyPatch.context() as mp:  # the folder from $RESLAB_DATA, no --data
        mp.setenv("RESLAB_DATA", str(data))
        assert main(["eval", "--checkpoint", str(run / "last.pt"), "--dataset", "folder"]) == 0
    assert f"{data / 'val'} (the validation set of {data})" in capsys.readouterr().err
    (other / "class_2").rename(other / "zebra")
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--dataset", "folder",
                 "--data", str(other)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "has class folders that are not among the 3 known classes: zebra" in err
    shutil.copytree(data / "val" / "class_0", data / "val" / "dog")
    cfg.out = str(tmp_path / "run2")
    with pytest.raises(DataError, match=r"val has class folders .* known classes: dog"):
        train(cfg, progress=False)


def test_max_pixels_reaches_the_training_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--max-pixels` / max_pixels: images over it are skipped (and said so) like any bomb."""
    import logging

    data = make_folder(tmp_path / "imgs")
    sizes = [Image.open(p).size for p in (data / "train").rglob("*.*") if p.name != "broken.jpg"]
    limit = sorted(w * h for w, h in sizes)[len(sizes) // 2]  # about half the images are over
    over = sum(w * h > limit for w, h in sizes)
    cfg = TrainConfig(
        model="resnet20", dataset="folder", data=str(data / "train"), out=str(tmp_path / "run"),
        image_size=32, resize=36, batch_size=4, iters=1, eval_every=1, save_every=1, workers=0,
        device="cpu", eval_splits=[], val_split=False, milestones=[], max_pixels=limit,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="reslab.data"):
        train(cfg, progress=False)
    assert f"{over} decompression bomb" in caplog.text
