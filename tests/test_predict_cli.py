"""`reslab predict` and `reslab export` end to end on real image files written with PIL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import reslab
from reslab.cli import main
from reslab.models.weights import CIFAR10_CLASSES, CIFAR10_PROJECT_PREPROCESS, save_safetensors

PRE = CIFAR10_PROJECT_PREPROCESS
SRC = str(Path(reslab.__file__).resolve().parents[1])


@pytest.fixture
def model_file(tmp_path: Path, cifar_test_images) -> tuple[Path, nn.Module]:
    images, _ = cifar_test_images
    torch.manual_seed(0)
    model = reslab.create_model("resnet20")
    for m in model.modules():  # BN statistics from real images: realistic activations
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    mean, std = (
        torch.tensor(PRE["mean"]).view(1, 3, 1, 1),
        torch.tensor(PRE["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        model.train()((images.float() / 255 - mean) / std)
    path = save_safetensors(
        model.eval(), tmp_path / "r20.safetensors", model_name="resnet20", model_options={},
        preprocess=PRE, classes=CIFAR10_CLASSES,
    )  # fmt: skip
    return path, model


def _write_images(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, img in enumerate(images):
        p = folder / f"img{i:02d}.png"  # lossless, so the pixels are exactly the CIFAR ones
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def test_predict_process_json_matches_model(tmp_path: Path, model_file, cifar_test_images) -> None:
    path, model = model_file
    images, _ = cifar_test_images
    imgs = images[:6]
    files = _write_images(tmp_path / "imgs", imgs)
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "notes.jpg").write_text("not a jpeg")
    jpg = tmp_path / "imgs" / "cut.jpg"
    Image.fromarray(imgs[0].permute(1, 2, 0).numpy()).resize((64, 64)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:200])
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "reslab", "predict", str(tmp_path / "imgs"), "--weights", str(path),
         "--topk", "3", "--json", "--precision", "fp32", "--batch-size", "4"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # 1: some images were unreadable
    assert "3 of 9 images could not be read" in proc.stderr
    out = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    assert "zero-byte" in out["empty.png"]["error"]
    assert "not an image" in out["notes.jpg"]["error"]
    assert "truncated" in out["cut.jpg"]["error"].lower()
    mean, std = (
        torch.tensor(PRE["mean"]).view(1, 3, 1, 1),
        torch.tensor(PRE["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        probs = model((imgs.float() / 255 - mean) / std).softmax(1)
    for f, p in zip(files, probs, strict=True):
        top = out[f.name]["top"]
        assert len(top) == 3
        assert [t["class"] for t in top] == [CIFAR10_CLASSES[i] for i in p.topk(3).indices]
        np.testing.assert_allclose([t["prob"] for t in top], p.topk(3).values, atol=1e-5)


def test_predict_text_default_precision_and_bad_paths(tmp_path: Path, model_file, capsys) -> None:
    path, _ = model_file
    img = tmp_path / "one.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(img)  # not 32x32: resized, cropped
    assert main(["predict", str(img), "--checkpoint", str(path), "--topk", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{img}: ") and line.count("%") == 2
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(path)]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    bare = tmp_path / "bare.pt"
    torch.save(reslab.create_model("resnet20").state_dict(), bare)
    assert main(["predict", str(img), "--weights", str(bare)]) == 2
    assert "--normalize" in capsys.readouterr().err
    assert main(["predict", str(img), "--weights", str(bare), "--normalize", "cifar10"]) == 0


def test_export_cli_onnx_carries_metadata(tmp_path: Path, model_file, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path, _ = model_file
    out = tmp_path / "r20.onnx"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["reslab.classes"]) == CIFAR10_CLASSES
    assert json.loads(props["reslab.preprocess"])["mean"] == PRE["mean"]
    bad = ["export", "--model", "resnet32", "--weights", str(path), "--format", "onnx"]
    assert main([*bad, "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "r20.safetensors" in err


def test_export_format_follows_the_suffix_of_out(tmp_path: Path, model_file, capsys) -> None:
    """--format may be left out where --out's suffix names it (.onnx, .pt/.ts: TorchScript);
    another suffix is one error line naming the file and both fixes, and nothing is written."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path, _ = model_file
    out = tmp_path / "r20.onnx"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert "(onnx, resnet20" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)))
    ts = tmp_path / "r20.pt"
    assert main(["export", "--checkpoint", str(path), "--out", str(ts)]) == 0
    assert "(torchscript, resnet20" in capsys.readouterr().out
    scripted = torch.jit.load(str(ts))
    assert scripted(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "r20.bin")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "r20.bin" in err and "--format onnx" in err
    assert not (tmp_path / "r20.bin").exists()


def test_predict_csv_rows_match_json_and_rate_is_reported(
    tmp_path: Path, model_file, cifar_test_images, capsys
) -> None:
    import csv

    path, _ = model_file
    files = _write_images(tmp_path / "imgs", cifar_test_images[0][:5])
    (tmp_path / "imgs" / "bad.png").write_text("not a png")
    out_csv = tmp_path / "preds.csv"
    argv = ["predict", str(tmp_path / "imgs"), "--weights", str(path), "--topk", "2",
            "--precision", "fp32", "--json", "--csv", str(out_csv)]  # fmt: skip
    assert main(argv) == 1  # one unreadable image
    captured = capsys.readouterr()
    assert "6 images in " in captured.err and "images/s" in captured.err
    preds = {Path(r["path"]).name: r for r in json.loads(captured.out)}
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == sorted([*preds])
    assert len(rows) == 6 and {f.name for f in files} < set(preds)
    for r in rows:
        p = preds[Path(r["path"]).name]
        if "error" in p:
            assert r["error"] == p["error"] and r["class_1"] == ""
        else:
            assert (r["class_1"], r["class_2"]) == tuple(t["class"] for t in p["top"])
            assert float(r["prob_1"]) == pytest.approx(p["top"][0]["prob"], abs=1e-6)
    assert main([*argv[:-1], str(tmp_path / "no" / "dir.csv")]) == 2
    assert "--csv" in capsys.readouterr().err


def test_csv_has_no_columns_beyond_the_model_classes(tmp_path: Path) -> None:
    import csv

    from reslab.predict import Prediction, write_csv

    preds = [Prediction("a.png", [("cat", 0.7), ("dog", 0.2), ("bird", 0.1)]),
             Prediction("b.png", [], error="cannot decode")]  # fmt: skip
    out = write_csv(preds, tmp_path / "p.csv", topk=5)  # 5 asked, the model knows 3
    with out.open() as f:
        head = next(csv.reader(f))
    assert head == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]


def test_csv_keeps_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    import os

    from reslab.predict import Prediction, write_csv

    name = os.fsdecode(b"/photos/caf\xe9.png")
    out = write_csv([Prediction(name, [("cat", 0.9)])], tmp_path / "p.csv", topk=1)
    assert b"/photos/caf\xe9.png,cat,0.900000" in out.read_bytes()


def test_text_output_prints_a_non_utf8_file_name_under_a_strict_encoding(tmp_path: Path) -> None:
    """PYTHONIOENCODING=utf-8 makes stdout strict: the name prints escaped, not as a traceback."""
    path = save_safetensors(
        reslab.create_model("resnet20").eval(), tmp_path / "r20.safetensors",
        model_name="resnet20", model_options={}, preprocess=PRE, classes=CIFAR10_CLASSES,
    )  # fmt: skip
    img = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(img)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONIOENCODING": "utf-8"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "reslab", "predict", str(img), "--weights", str(path), "--topk", "1"],
        capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().startswith(f"{tmp_path}/caf\\udce9.png: ")


def test_collect_images_names_an_unreadable_folder(tmp_path: Path, monkeypatch) -> None:
    from reslab.predict import PredictError, collect_images

    _write_images(tmp_path / "imgs", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    (tmp_path / "imgs" / "sub").mkdir()
    assert [p.name for p in collect_images([tmp_path / "imgs"])] == ["img00.png", "img01.png"]
    real = os.scandir

    def scandir(path="."):  # root reads any folder: make this one fail as chmod 000 would
        if Path(path) == tmp_path / "imgs" / "sub":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PredictError, match=r"^permission denied: .*imgs/sub; fix its perm"):
        collect_images([tmp_path / "imgs"])


def test_a_named_pipe_is_not_a_regular_file(tmp_path: Path) -> None:
    """It had been reported as not existing (and opening it would block)."""
    from reslab.predict import PredictError, collect_images

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(PredictError, match=r"fifo\.jpg is not a regular file"):
        collect_images([fifo])
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(PredictError, match=r"gone\.jpg is a symbolic link to a file that does not"):
        collect_images([tmp_path / "gone.jpg"])


def test_max_pixels_is_a_flag_of_every_command_that_reads_images(
    tmp_path: Path, model_file, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README pointed at --max-pixels, which only `data check` had. A limit below an image
    skips it; a limit above PIL's own (PIL refuses twice its MAX_IMAGE_PIXELS whatever reslab
    says) is lent to PIL while the file is opened."""
    from PIL import Image as PILImage

    path, _ = model_file
    img = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(img)  # 2,000 pixels
    # 1: no image could be read
    assert main(["predict", str(img), "--checkpoint", str(path), "--max-pixels", "1999"]) == 1
    assert "decompression bomb: 50x40 = 2,000 pixels is over the limit of 1,999" in (
        capsys.readouterr().out
    )
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)  # PIL alone: refused above 1,000
    assert main(["predict", str(img), "--checkpoint", str(path), "--json"]) == 1
    assert "decompression bomb" in capsys.readouterr().out
    assert main(["predict", str(img), "--checkpoint", str(path), "--json", "--max-pixels",
                 "4000"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert '"error"' not in out and "%" not in out and '"top"' in out
    assert PILImage.MAX_IMAGE_PIXELS == 500  # lent, then given back
    from reslab.cli import build_parser

    for argv in (["train"], ["eval", "--checkpoint", "c.pt"], ["data", "stats", "d"],
                 ["data", "check", "d"]):  # fmt: skip
        assert build_parser().parse_args([*argv, "--max-pixels", "7"]).max_pixels == 7


def test_export_into_a_folder_that_refuses_files_names_out(model_file, capsys) -> None:
    """/proc accepts no new file: the export fails at its atomic write, and the line names
    --out (not the temporary file beside it)."""
    if not Path("/proc/self").exists():
        pytest.skip("needs Linux's /proc")
    path, _ = model_file
    out = "/proc/reslab-test.pt"
    assert main(["export", "--checkpoint", str(path), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}: " in err[0] and ".tmp" not in err[0], err


def test_one_path_given_as_a_string_is_one_path(tmp_path: Path, monkeypatch) -> None:
    """collect_images("dir") had walked "/" (the string's first character) and predict_files
    reported each character as a file it could not read (helper audit C, M6)."""
    from reslab.inference import InferenceModel
    from reslab.predict import collect_images, predict_files

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    assert collect_images(str(tmp_path / "imgs")) == [tmp_path / "imgs" / "a.png"]
    assert collect_images(tmp_path / "imgs") == [tmp_path / "imgs" / "a.png"]
    runner = InferenceModel(reslab.create_model("resnet20").eval(), precision="fp32")
    pre = {**CIFAR10_PROJECT_PREPROCESS}
    preds = predict_files(runner, str(tmp_path / "imgs" / "a.png"), preprocess=pre, classes=None)
    assert len(preds) == 1 and preds[0].error is None
    with pytest.raises(ValueError, match="topk and batch_size must be >= 1"):
        predict_files(runner, [tmp_path / "imgs" / "a.png"], preprocess=pre, classes=None, topk=0)
