"""ONNX / TorchScript export: dynamic batch, metadata inside the file, same numbers as PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.export import export_model, read_export_metadata
from reslab.models.weights import CIFAR10_CLASSES, CIFAR10_PROJECT_PREPROCESS

PRE = CIFAR10_PROJECT_PREPROCESS


def _real_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    # [N, 3, 32, 32] uint8 CIFAR-10 test images -> normalised float, upsampled for 224 nets.
    mean, std = (
        torch.tensor(PRE["mean"]).view(1, 3, 1, 1),
        torch.tensor(PRE["std"]).view(1, 3, 1, 1),
    )
    x = (images.float() / 255 - mean) / std
    return x if size == 32 else F.interpolate(x, size=size, mode="bilinear", antialias=False)


def _calibrated(name: str, x: torch.Tensor) -> nn.Module:
    # BN statistics from real images, so activations have realistic scale (as in a trained net).
    torch.manual_seed(0)
    model = reslab.create_model(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.mark.parametrize(("name", "size"), [("resnet20", 32), ("resnet18", 224)])
def test_onnx_matches_pytorch_on_real_images(
    tmp_path: Path, cifar_test_images, name: str, size: int
) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's exporter (not on the GPU image)
    images, _ = cifar_test_images
    x = _real_batch(images[:8], size)
    model = _calibrated(name, x)
    path = export_model(
        model, tmp_path / f"{name}.onnx", format="onnx", input_size=size, model_name=name,
        model_options={}, preprocess=PRE, classes=CIFAR10_CLASSES,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str)  # symbolic (dynamic) batch dimension
    for batch in (1, 3):
        xb = x[:batch]
        (got,) = session.run(None, {inp.name: xb.numpy()})
        with torch.no_grad():
            want = model(xb).numpy()
        assert got.shape == (batch, want.shape[1])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    meta = read_export_metadata(path)
    assert meta["preprocess"] == PRE and meta["classes"] == CIFAR10_CLASSES
    assert meta["model_name"] == name and meta["input_size"] == size


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_dynamic_batch_and_per_pixel_mean(tmp_path: Path) -> None:
    model = reslab.create_model("resnet20").eval()
    mean_img = torch.rand(3, 32, 32)
    pre = {**PRE, "mode": "per_pixel", "mean": mean_img, "std": [1.0, 1.0, 1.0]}
    path = export_model(
        model, tmp_path / "r20.pt", format="torchscript", input_size=32, model_name="resnet20",
        preprocess=pre, classes=CIFAR10_CLASSES,
    )  # fmt: skip
    loaded = torch.jit.load(str(path))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    meta = read_export_metadata(path)
    torch.testing.assert_close(torch.tensor(meta["preprocess"]["mean"]), mean_img)


def test_bad_format_and_missing_dir(tmp_path: Path) -> None:
    model = reslab.create_model("resnet20")
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, tmp_path / "m.x", format="tflite", input_size=32)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        export_model(model, tmp_path / "no_such_dir" / "m.onnx", format="onnx", input_size=32)


def test_onnx_export_without_onnxscript_is_one_line(tmp_path: Path, monkeypatch) -> None:
    # The GPU image has onnx and onnxruntime but not onnxscript, which torch.onnx's exporter
    # imports: a ModuleNotFoundError from deep in torch, a traceback from `reslab export`.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` fails too
    model = reslab.create_model("resnet20")
    with pytest.raises(ValueError, match=r"needs onnxscript: pip install onnxscript"):
        export_model(model, tmp_path / "m.onnx", format="onnx", input_size=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_leaves_the_callers_model_as_it_was(tmp_path: Path, fmt: str) -> None:
    """export_model exports a copy: the caller's model stays in train mode, in its dtype (it was
    switched to eval mode and cast to float32 in place, so a training loop that exported a
    snapshot went on training with frozen BatchNorm statistics without a word)."""
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    model = reslab.create_model("resnet20").to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt'}"
    export_model(model, out, format=fmt, input_size=32)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert read_export_metadata(out)["input_size"] == 32


def test_writers_name_the_target_not_their_temporary_file(tmp_path: Path) -> None:
    """A folder where the file should go, or no folder for it: the error names the path given
    (the OS had named `.NAME.tmpPID`, a file the user never asked for; helper audit C, M8)."""
    from reslab.models.weights import save_safetensors
    from reslab.predict import Prediction, write_csv

    model = reslab.create_model("resnet20")
    (tmp_path / "d.onnx").mkdir()
    (tmp_path / "w.safetensors").mkdir()
    (tmp_path / "p.csv").mkdir()
    calls = {
        "d.onnx": lambda p: export_model(model, p, format="onnx", input_size=32),
        "w.safetensors": lambda p: save_safetensors(model, p, model_name="resnet20",
                                                     model_options={}, preprocess=None,
                                                     classes=None),
        "p.csv": lambda p: write_csv([Prediction("a.png", [("cat", 0.9)], None)], p, topk=1),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(IsADirectoryError) as e:
            call(tmp_path / name)
        assert e.value.filename == str(tmp_path / name) and ".tmp" not in str(e.value)
        missing = tmp_path / "nope" / name
        with pytest.raises(FileNotFoundError) as e:
            call(missing)
        assert str(tmp_path / "nope") in str(e.value) and ".tmp" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "p.csv", "w.safetensors"]


def test_metadata_of_files_that_are_not_exports_is_one_line(tmp_path: Path) -> None:
    """A plain torch.save file, junk named .onnx and an upper-case .ONNX: one ValueError naming
    the file (torch's zip reader and protobuf had spoken for it); a bad input_size is refused
    before any export (helper audit C, M9-M10)."""
    pytest.importorskip("onnxscript")
    model = reslab.create_model("resnet20")
    onnx_upper = export_model(model, tmp_path / "M.ONNX", format="onnx", input_size=32)
    assert read_export_metadata(onnx_upper)["input_size"] == 32
    torch.save({"a": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\xff" * 50)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    for name, needle in (("plain.pt", "carries no reslab metadata"),
                         ("junk.onnx", "not a readable ONNX file"),
                         ("junk.pt", "not a TorchScript export")):  # fmt: skip
        with pytest.raises(ValueError, match=needle) as e:
            read_export_metadata(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    for bad in (0, "32", 5000, True):
        with pytest.raises(ValueError, match="input_size must be a whole number of pixels"):
            export_model(model, tmp_path / "x.onnx", format="onnx", input_size=bad)
    assert not (tmp_path / "x.onnx").exists()
