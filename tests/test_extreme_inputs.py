"""Inputs under every limit that still broke a command, and outputs a kill could empty:

- A thin strip (1 x N pixels) passes the decompression-bomb check as stored but becomes
  R x (R * N) pixels once its shorter side is resized to R: a 116 KB PNG asked for 114 GiB and
  ended predict, eval and folder training with "out of memory". It is now one bad file.
- A weights file whose per-pixel mean image is not input_size x input_size passed check_meta and
  ended predict in a broadcasting traceback.
- eval.json and the PNGs of eval and plot were written in place: a kill mid-write left the
  previous file empty. They are written atomically now (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import resource
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.data.folder import ImageFolder
from reslab.data.preprocess import named_preprocess
from reslab.predict import predict_files


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _strip_png(path: Path, width: int) -> Path:
    """A valid grey RGB PNG of width x 1 pixels (a few KB for any width)."""
    raw = zlib.compress(b"\0" + b"\x80" * (3 * width), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, 8, 2, 0, 0, 0))
                     + _chunk(b"IDAT", raw) + _chunk(b"IEND", b""))  # fmt: skip
    return path


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


# --- a thin strip is one bad image, not a command's end --------------------------------------


def test_predict_reports_a_strip_that_resizing_would_blow_up(tmp_path: Path) -> None:
    # 20,000 pixels, far under the limit below; resized to a shorter side of 32 it would be
    # 32 x 640,000 = 20.5 million pixels, over it. (The real case: 40,000,000 x 1 at the
    # default limit asked for 114 GiB.)
    good, strip = _png(tmp_path / "good.png"), _strip_png(tmp_path / "strip.png", 20_000)
    seen: list[tuple[int, ...]] = []

    def runner(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return torch.zeros(len(x), 10)

    preds = predict_files(runner, [good, strip], preprocess=named_preprocess(
        name="cifar10", input_size=32), classes=None, max_pixels=1_000_000)  # fmt: skip
    assert preds[0].error is None and preds[0].top
    assert preds[1].error is not None and preds[1].error.startswith("extreme aspect ratio")
    assert "20000x1" in preds[1].error
    assert seen == [(1, 3, 32, 32)]  # the good image alone went through the model


def _folder_with_a_strip(root: Path, per_class: int) -> Path:
    """Class folders a/ and b/ of `per_class` 40x40 PNGs each, and a 20000x1 strip in a/."""
    for i in range(per_class):
        _png(root / "a" / f"{i}.png", i)
        _png(root / "b" / f"{i}.png", 10 + i)
    _strip_png(root / "a" / "strip.png", 20_000)
    return root


def test_a_strip_in_an_image_folder_is_skipped_not_resized(tmp_path: Path) -> None:
    root = _folder_with_a_strip(tmp_path / "data", 3)
    # Test-time: shorter side to 36 before the crop (`resize`): found when it is loaded.
    ds = ImageFolder(root, max_pixels=1_000_000, resize=36)
    i = next(k for k, (p, _) in enumerate(ds.samples) if p.endswith("strip.png"))
    img, _ = ds[i]  # replaced by the next usable sample of the set
    assert max(img.shape[-2:]) <= 40
    assert [(Path(b.path).name, b.reason) for b in ds.skipped()] == [
        ("strip.png", "extreme aspect ratio")
    ]
    # Training upscales to min_size: the up-front scan already leaves it out (from its header).
    ds = ImageFolder(root, max_pixels=1_000_000, min_size=32)
    assert not [p for p, _ in ds.samples if p.endswith("strip.png")]
    assert [Path(b.path).name for b in ds.report.bad] == ["strip.png"]
    assert ds.report.bad[0].reason.startswith("extreme aspect ratio")


def test_a_strip_that_fits_after_resizing_is_still_read(tmp_path: Path) -> None:
    # 2000 x 1 at a shorter side of 32: 32 x 64,000 = 2 million pixels, under 89.5 million.
    strip = _strip_png(tmp_path / "wide.png", 2000)
    preds = predict_files(lambda x: torch.zeros(len(x), 10), [strip],
                          preprocess=named_preprocess(name="cifar10", input_size=32),
                          classes=None)  # fmt: skip
    assert preds[0].error is None


def test_a_png_wider_than_libpngs_limit_is_read_without_its_stderr_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """libpng (in torchvision.io) refuses sides over 10^6 pixels, printing two lines of its own
    in C before PIL read the image anyway; those lines came before reslab's own."""
    from reslab.data.images import load_image

    img = load_image(_strip_png(tmp_path / "w.png", 1_200_000), max_pixels=2_000_000)
    assert img.shape == (3, 1, 1_200_000) and int(img[:, 0, ::100_000].float().mean()) == 128
    assert "libpng" not in "".join(capfd.readouterr())


# --- a per-pixel mean image of another size --------------------------------------------------


def test_weights_with_a_mean_image_of_another_size_are_refused_in_one_line(
    tmp_path: Path, capsys
) -> None:
    from safetensors.torch import save_file

    from reslab.cli import main
    from reslab.models import create_model

    sd = {k: v.contiguous() for k, v in create_model("resnet20").state_dict().items()}
    pre = {"kind": "cifar", "input_size": 32, "resize": None, "mode": "per_pixel",
           "mean": torch.rand(3, 5, 5).tolist(), "std": [1.0, 1.0, 1.0]}  # fmt: skip
    weights = tmp_path / "mean5.safetensors"
    save_file(sd, str(weights), metadata={"format": "reslab", "model_name": "resnet20",
                                          "model_options": "{}", "preprocess": json.dumps(pre),
                                          "classes": "null"})  # fmt: skip
    img = _png(tmp_path / "x.png")
    assert main(["predict", str(img), "--weights", str(weights)]) == 2  # was a RuntimeError
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0] and "mean image is 5x5" in err[0], err


# --- outputs written atomically ----------------------------------------------------------------


def _fails_mid_write(fn) -> None:
    """Run fn() with files limited to 64 bytes: the first larger write fails part-way (EFBIG),
    as a kill or a full disk would leave it."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, old[1]))
    try:
        with pytest.raises(OSError):
            fn()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_eval_report_and_figures_keep_the_previous_file_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import reslab.analysis.plots as plots
    from reslab.engine.eval_run import write_outputs
    from reslab.engine.evaluator import EnsembleResult, EvalResult

    conf = torch.tensor([[3, 1], [0, 4]])
    r = EvalResult(12.5, 0.0, 0.3, 8, torch.tensor([75.0, 100.0], dtype=torch.float64), conf,
                   name="m")  # fmt: skip
    out = tmp_path / "eval"
    out.mkdir()
    report, png = out / "eval.json", out / "confusion-m.png"
    report.write_text('{"old": 1}')
    png.write_bytes(b"old png")

    def write(meta: dict) -> None:
        write_outputs(EnsembleResult([r], r), ["a", "b"], out_dir=out, json_path=None, meta=meta)

    _fails_mid_write(lambda: write({}))  # the PNG comes first: its write fails
    assert png.read_bytes() == b"old png"
    assert report.read_text() == '{"old": 1}'
    monkeypatch.setattr(plots, "plot_confusion", lambda *a, **k: None)  # now the JSON's fails
    _fails_mid_write(lambda: write({"note": "x" * 200}))
    assert report.read_text() == '{"old": 1}'
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    write({})  # and with room to write, both are replaced
    assert json.loads(report.read_text())["members"][0]["name"] == "m"


def test_data_check_and_the_training_scan_report_a_strip_before_decoding(tmp_path: Path) -> None:
    from reslab.data.check import check_folder
    from reslab.data.folder import scan_folder

    root = _folder_with_a_strip(tmp_path / "data", 2)
    for check in ("header", "decode"):
        report = scan_folder(root, check=check, min_size=32, max_pixels=1_000_000, warn=False)
        assert [Path(b.path).name for b in report.bad] == ["strip.png"], check
        assert report.bad[0].reason.startswith("extreme aspect ratio: 20000x1"), check
        assert len(report.samples) == 4
    text = check_folder(root, min_size=32, max_pixels=1_000_000)
    assert "1 skipped (1 extreme aspect ratio)" in text
