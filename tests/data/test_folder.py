"""Image folders with every kind of bad input, made with PIL in a temporary directory."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reslab.cli import main
from reslab.data.cifar import DataError
from reslab.data.folder import ImageFolder, ScanReport, read_label_file, scan_folder
from reslab.data.images import BadImageError, load_image, read_header
from reslab.data.transforms import center_crop_transform

RNG = np.random.default_rng(0)


def _rgb(h: int = 48, w: int = 64) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A real PNG header declaring side x side pixels (10 Gpixels) with a tiny body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    good, odd, broken = root / "a_good", root / "b_odd", root / "c_broken"
    for d in (good, odd, broken, root / "d_empty"):
        d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_rgb()).save(good / f"img{i}.jpg", quality=92)
    Image.fromarray(_rgb()).save(good / "lossless.png")
    base = _rgb()
    Image.fromarray(base).convert("L").save(odd / "grey.png")
    Image.fromarray(base).convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([base, np.full(base.shape[:2], 7, np.uint8)])).save(odd / "rgba.png")
    Image.fromarray(base).convert("P").save(odd / "palette.png")
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(odd / "deep16.png")
    Image.fromarray(base).save(odd / "bitmap.bmp")
    Image.fromarray(base).save(odd / "scan.tiff")
    Image.fromarray(_rgb(12, 20)).save(odd / "tiny.png")  # smaller than any crop
    (odd / "notes.txt").write_text("not an image, and not named like one")
    data = (good / "img0.jpg").read_bytes()
    (broken / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "text.png").write_text("<html>this is not a PNG</html>")
    _bomb_png(broken / "bomb.png")
    return root


def test_conversions_are_exact(bad_folder: Path) -> None:
    odd = bad_folder / "b_odd"
    with Image.open(odd / "grey.png") as im:
        grey = torch.from_numpy(np.array(im))
    g = load_image(odd / "grey.png")
    assert g.shape == (3, 48, 64) and g.dtype == torch.uint8
    assert all(torch.equal(g[c], grey) for c in range(3))
    with Image.open(odd / "rgba.png") as im:
        rgb = torch.from_numpy(np.array(im)[..., :3]).permute(2, 0, 1)
    assert torch.equal(load_image(odd / "rgba.png"), rgb)  # alpha dropped, colour untouched
    with Image.open(odd / "palette.png") as im:
        pal = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(load_image(odd / "palette.png"), pal)
    deep = load_image(odd / "deep16.png")  # 16-bit v*257 scales back to exactly v, not clipped
    with Image.open(odd / "rgba.png") as im:
        red = torch.from_numpy(np.array(im)[..., 0])
    assert deep.dtype == torch.uint8 and torch.equal(deep[1], red)
    for name in ("bitmap.bmp", "scan.tiff"):  # PIL fallback formats
        assert torch.equal(load_image(odd / name), rgb)
    with Image.open(odd / "cmyk.jpg") as im:
        ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).int()
    assert (load_image(odd / "cmyk.jpg").int() - ref).abs().float().mean() < 2.0


def test_bad_files_raise_named_errors(bad_folder: Path) -> None:
    broken = bad_folder / "c_broken"
    cases = {
        "zero.jpg": "zero-byte",
        "text.png": "not an image",
        "bomb.png": "decompression bomb",
        "truncated.jpg": "truncated",
    }
    for name, why in cases.items():
        with pytest.raises(BadImageError, match=why) as e:
            load_image(broken / name)
        assert e.value.path.endswith(name)
    with pytest.raises(BadImageError, match=r"max_pixels"):
        read_header(bad_folder / "a_good" / "img0.jpg", max_pixels=1000)  # 48*64 > 1000


def test_scan_reports_every_case(bad_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="reslab.data"):
        header = scan_folder(bad_folder, check="header", min_size=32)
    bad = {Path(b.path).name: b.reason for b in header.bad}
    assert set(bad) == {"zero.jpg", "text.png", "bomb.png"}  # truncation needs a decode
    assert (
        "10,000,000,000 pixels is more than twice the limit of" in bad["bomb.png"]
        and "MAX_IMAGE_PIXELS" in bad["bomb.png"]
    )
    assert header.per_class() == [4, 8, 1, 0] and header.empty_classes == ["d_empty"]
    assert header.ignored == 1 and [Path(p).name for p in header.small] == ["tiny.png"]
    assert set(header.converted) == {
        "greyscale -> RGB",
        "CMYK -> RGB",
        "RGBA -> RGB (alpha dropped)",
        "palette -> RGB",
        "16-bit -> RGB uint8",
    }
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping ") for m in lines) == 3 and all("\n" not in m for m in lines)
    full = scan_folder(bad_folder, check="decode", min_size=32, warn=False)
    assert {Path(b.path).name for b in full.bad} == {
        "zero.jpg",
        "text.png",
        "bomb.png",
        "truncated.jpg",
    }
    assert full.per_class() == [4, 8, 0, 0] and full.empty_classes == ["c_broken", "d_empty"]
    text = full.format()
    assert (
        "truncated.jpg: corrupt or truncated" in text
        and "EMPTY" in text
        and "12 usable images in 4 classes" in text
    )
    short = full.format(max_list=1)  # each long list says how much it left out
    assert "unusable files (4):" in short and "  ... and 3 more" in short
    many_small = ScanReport(root="r", classes=["a"], small=[f"s{i}.png" for i in range(60)],
                            min_size=224)  # fmt: skip
    tail = many_small.format().split("smaller than 224px")[1]
    assert tail.count(".png") == 50 and "  ... and 10 more" in tail


def test_late_failure_is_replaced_and_counted(bad_folder: Path) -> None:
    broken = bad_folder / "c_broken"
    for name in ("zero.jpg", "text.png", "bomb.png"):
        (broken / name).unlink()
    Image.fromarray(_rgb()).save(broken / "z_ok.jpg")
    ds = ImageFolder(
        bad_folder, transform=center_crop_transform(resize=32, crop_size=24), min_size=24
    )
    names = [Path(p).name for p, _ in ds.samples]
    t = names.index("truncated.jpg")  # passed the header scan; fails when decoded
    x, y = ds[t]
    assert x.shape == (3, 24, 24) and y == 2
    assert torch.equal(x, ds[t + 1][0])  # deterministic: the next usable sample
    assert [Path(b.path).name for b in ds.skipped()] == ["truncated.jpg"]
    # Real worker processes: nothing crashes, every batch is full, the skip is seen from here.
    ds2 = ImageFolder(
        bad_folder, transform=center_crop_transform(resize=32, crop_size=24), min_size=24
    )
    batches = list(DataLoader(ds2, batch_size=5, num_workers=2))
    assert sum(len(b[1]) for b in batches) == len(ds2)
    assert [Path(b.path).name for b in ds2.skipped()] == ["truncated.jpg"]


def test_a_split_replaces_a_late_failure_from_its_own_samples(bad_folder: Path) -> None:
    """A held-out file that fails to decode is replaced by the next VALIDATION sample, never by
    the training image that follows it on disk (and the other way round)."""
    broken = bad_folder / "c_broken"
    for name in ("zero.jpg", "text.png", "bomb.png"):
        (broken / name).unlink()
    Image.fromarray(_rgb()).save(broken / "y_next.jpg")  # on disk right after truncated.jpg
    Image.fromarray(_rgb()[::-1].copy()).save(broken / "z_last.jpg")
    ds = ImageFolder(bad_folder, transform=center_crop_transform(resize=32, crop_size=24),
                     min_size=24)  # fmt: skip
    names = [Path(p).name for p, _ in ds.samples]
    t, nxt, last = (names.index(n) for n in ("truncated.jpg", "y_next.jpg", "z_last.jpg"))
    assert nxt == t + 1
    val = ds.select([0, t, last])  # y_next.jpg belongs to the other split
    train = ds.select([i for i in range(len(ds)) if i not in (0, t, last)])
    assert len(val) == 3 and len(train) == len(ds) - 3
    assert torch.equal(val[1][0], ds[last][0])  # the view's next sample, not y_next.jpg
    assert not torch.equal(val[1][0], ds[nxt][0])
    assert torch.equal(val.select([1, 2])[0][0], ds[last][0])  # views of views compose
    assert [Path(b.path).name for b in ds.skipped()] == ["truncated.jpg"]  # marks are shared


def test_an_index_past_either_end_is_an_index_error(tmp_path: Path) -> None:
    """ds[len(ds)] raises IndexError (it wrapped round to sample 0), so `for x, y in ds` and
    `list(ds)`, which stop at the first IndexError, end after len(ds) samples instead of never;
    negative indices count from the end as in a list."""
    for k in range(4):
        (tmp_path / f"class_{k % 2}").mkdir(exist_ok=True)
        Image.fromarray(_rgb()).save(tmp_path / f"class_{k % 2}" / f"img{k}.png")
    ds = ImageFolder(tmp_path, transform=center_crop_transform(resize=32, crop_size=24))
    n = len(ds)
    assert n == 4
    for i in (n, n + 1, -n - 1, 10**6):
        with pytest.raises(IndexError, match=f"index {i} is out of range for {n} samples"):
            ds[i]
    assert torch.equal(ds[-1][0], ds[n - 1][0]) and ds[-n][1] == ds[0][1]
    assert len(list(ds)) == n
    view = ds.select([1, 2])
    with pytest.raises(IndexError):
        view[2]
    assert len(list(view)) == 2


def test_small_images_are_upscaled(bad_folder: Path) -> None:
    ds = ImageFolder(bad_folder, min_size=32)
    i = [Path(p).name for p, _ in ds.samples].index("tiny.png")
    assert ds[i][0].shape == (3, 32, 53)  # shorter side 12 -> 32, aspect kept


def test_missing_and_unusable_directories(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        scan_folder(tmp_path / "nope")
    (tmp_path / "flat.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no class subfolders"):
        scan_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{tmp_path} has no usable image"):
        scan_folder(tmp_path, warn=False)


def test_imagenet_val_layout(tmp_path: Path) -> None:
    val = tmp_path / "val"
    val.mkdir()
    for i in range(4):
        Image.fromarray(_rgb()).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "val.txt").write_text(
        "ILSVRC2012_val_00000000.JPEG n02\nILSVRC2012_val_00000001.JPEG n01\nILSVRC2012_val_00000002.JPEG n02\n"
    )
    classes = ["n01", "n02", "n03"]  # the training folder's order
    ds = ImageFolder(val, labels_file=tmp_path / "val.txt", classes=classes)
    assert ds.classes == classes and ds.targets == [1, 0, 1]
    assert [Path(b.path).name for b in ds.report.bad] == [
        "ILSVRC2012_val_00000003.JPEG"
    ]  # unlabelled
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nILSVRC2012_val_00000003,n03 1 2 3 4 n03 5 6 7 8\n")
    labels, _ = read_label_file(kaggle, classes=classes)
    assert labels == {"ILSVRC2012_val_00000003": 2}
    with pytest.raises(DataError, match=r"'n02' for ILSVRC2012_val_00000000\.JPEG is not one"):
        read_label_file(tmp_path / "val.txt", classes=["n09"])


def test_cli_check_folder_prints_the_truth(bad_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(bad_folder), "--min-size", "32"]) == 0
    out = capsys.readouterr().out
    for line in (
        "a_good                                  4",
        "b_odd                                   8",
        "d_empty",
    ):
        assert line in out
    for name in (
        "zero.jpg: zero-byte file",
        "text.png: not an image",
        "bomb.png: decompression bomb",
        "truncated.jpg: corrupt or truncated",
    ):
        assert name in out
    assert main(["data", "check", str(bad_folder / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_cli_check_cifar_prints_the_truth(cifar_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(cifar_root)]) == 0
    out = capsys.readouterr().out
    assert "train: 50000 images" in out and "test: 10000 images" in out and "10 classes" in out
    assert out.count("5000 /   1000") == 10 and "train45k 45000 / val5k 5000" in out


def test_scan_with_worker_processes_agrees(tmp_path: Path) -> None:
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(100):
            Image.fromarray(_rgb(4, 4)).save(tmp_path / f"c{c}" / f"{i}.png")
    (tmp_path / "c1" / "50.png").write_bytes(b"")
    serial = scan_folder(tmp_path, check="decode", warn=False)
    parallel = scan_folder(tmp_path, check="decode", num_workers=2, warn=False)
    assert serial.samples == parallel.samples and serial.bad == parallel.bad
    assert serial.per_class() == [100, 99, 100]


def test_label_files_with_a_huge_index_or_other_bytes_are_refused_at_once(tmp_path: Path) -> None:
    from reslab.data.cifar import DataError

    huge = tmp_path / "huge.txt"
    huge.write_text("0.png 0\n1.png 99999999\n")  # once a list of 10^8 class names (23 GB)
    with pytest.raises(DataError, match=r"huge\.txt: label 99999999 for 1\.png is beyond 99999"):
        read_label_file(huge)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9.png 0\n")
    with pytest.raises(DataError, match=r"latin\.txt is not UTF-8 text"):
        read_label_file(latin)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_exif_orientation_turns_a_photo_upright(tmp_path: Path, suffix: str) -> None:
    """A phone photo stored sideways with Orientation=6 ("rotate 90 clockwise to show") is
    decoded as it is shown: the stored left half is the shown top half."""
    px = np.zeros((20, 40, 3), np.uint8)
    px[:, :20] = 255  # stored 20 high x 40 wide, left half white
    im = Image.fromarray(px)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / f"rot{suffix}"
    im.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {}))
    x = load_image(path)
    assert tuple(x.shape) == (3, 40, 20)
    assert x[:, :15].float().mean() > 240 and x[:, -15:].float().mean() < 15
