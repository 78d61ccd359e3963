"""Image folders that mislead: a symlink loop (images counted many times) and a single class
(trains to loss 0 and learns nothing). Real PNG files made with PIL."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.cli import main
from reslab.data.folder import list_samples


def _pngs(d: Path, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(d)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_symlink_loop_counts_each_image_once(tmp_path: Path, caplog) -> None:
    root = tmp_path / "train"
    _pngs(root / "cat" / "sub", 3)
    _pngs(root / "dog", 2)
    (root / "cat" / "sub" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "again").symlink_to(root / "dog", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="reslab.data"):
        classes, samples, *_ = list_samples(root)
    assert classes == ["cat", "dog"]
    assert sorted(lab for _, lab in samples) == [0, 0, 0, 1, 1]  # os.walk alone: 3 x ~40 + ...
    assert any("already read" in r.getMessage() for r in caplog.records)


def test_symlinked_directory_outside_the_tree_is_followed(tmp_path: Path) -> None:
    _pngs(tmp_path / "elsewhere", 2)
    root = tmp_path / "train"
    _pngs(root / "a", 1)
    (root / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _, samples, *_ = list_samples(root)
    assert sorted(lab for _, lab in samples) == [0, 1, 1]


@pytest.mark.parametrize("layout", ["one_class", "one_class_with_images"])
def test_fewer_than_two_classes_refused(tmp_path: Path, capsys, layout: str) -> None:
    root = tmp_path / "imgs"
    _pngs(root / "only", 6)
    if layout == "one_class_with_images":
        (root / "empty").mkdir()
    rc = main([
        "train", "--model", "resnet18", "--dataset", "folder", "--data", str(root), "--out",
        str(tmp_path / "run"), "--device", "cpu", "--iters", "2", "--set", "batch_size=4",
        "--set", "image_size=32", "--set", "resize=36", "--set", "workers=0",
        "--set", "eval_splits=[]",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "images in 1 class folder(s) (only); a classifier needs at least two" in err


def test_an_animation_decodes_one_frame_and_a_huge_file_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from reslab.data import images
    from reslab.data.images import BadImageError, load_image

    # 40 frames of 2000x2000: 160 Mpixels (480 MB as RGB) if every frame were decoded, which
    # torchvision's decoder does; the header check only sees one frame's 4 Mpixels.
    frames = [Image.new("P", (2000, 2000), i % 2) for i in range(40)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    del frames
    decoded = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    img = load_image(gif)
    assert img.shape == (3, 2000, 2000) and not decoded  # PIL read the first frame alone
    still = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(still)
    assert load_image(still).shape == (3, 8, 8) and decoded == [1]  # the fast path otherwise
    # A file bigger than any image under the pixel limit: refused from its size, never read.
    big = tmp_path / "big.png"
    big.write_bytes(gif.read_bytes()[:64])
    os.truncate(big, 8 * 1000 * 1000 + (16 << 20) + 1)  # sparse: no disk used
    with pytest.raises(BadImageError, match="more than any image of at most 1,000,000 pixels"):
        load_image(big, max_pixels=1_000_000)


def test_an_ico_whose_embedded_png_is_a_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    """PIL decodes an ICO's embedded PNG inside Image.open, before reslab compares the
    header's size (16x16 here) with its limit: PIL's own check must stay on, at reslab's limit
    (a version that lifted it decoded a 40000x40000 payload during the header scan)."""
    import io
    import struct

    from PIL import Image

    from reslab.data.images import BadImageError, read_header

    buf = io.BytesIO()
    Image.new("1", (1000, 1000)).save(buf, "PNG")  # 1 Mpixel, a few hundred bytes
    png = buf.getvalue()
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22)
    path = tmp_path / "icon.png"  # PIL goes by the content, not the name
    path.write_bytes(struct.pack("<HHH", 0, 1, 1) + entry + png)
    with pytest.raises(
        BadImageError, match="bomb: 1,000,000 pixels is more than twice the limit of 10,000;"
    ):
        read_header(path, max_pixels=10_000)
