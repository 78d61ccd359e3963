"""Data statistics: exact against numpy, real CIFAR-10 means, the saved file, the CLI."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from reslab.cli import main
from reslab.data.cifar import DataError, download_cifar
from reslab.data.preprocess import CIFAR10_STD
from reslab.data.stats import (
    DataStats,
    compute_cifar_stats,
    compute_folder_stats,
    compute_stats,
    load_stats,
    save_stats,
)


def test_compute_stats_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    # Correlated channels, so the covariance has a clear eigen structure.
    base = torch.randint(0, 200, (40, 1, 6, 5), generator=g)
    x = (base + torch.randint(0, 56, (40, 3, 6, 5), generator=g)).to(torch.uint8)
    stats = compute_stats([x[:15], x[15:]])
    px = x.permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    cov = np.cov(px, bias=True)
    val, vec = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats.mean, px.mean(1), atol=1e-12)
    np.testing.assert_allclose(stats.std, px.std(1), atol=1e-9)
    np.testing.assert_allclose(stats.eigval, val[::-1], atol=1e-9)
    ours = np.array(stats.eigvec)
    for i in range(3):  # same axes up to sign
        assert abs(abs(ours[:, i] @ vec[:, 2 - i]) - 1) < 1e-9
    torch.testing.assert_close(stats.mean_image, (x.double().mean(0) / 255).float())
    assert stats.count == 40
    with pytest.raises(ValueError, match="uint8"):
        compute_stats([x.float()])


def test_cifar10_per_pixel_mean_matches_published_means(cifar_root: Path, tmp_path: Path) -> None:
    stats = compute_cifar_stats(cifar_root)
    assert stats.count == 50000 and stats.mean_image.shape == (3, 32, 32)
    means = stats.mean_image.mean((1, 2))  # the mean image, averaged per channel
    torch.testing.assert_close(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(stats.std, CIFAR10_STD, atol=1e-4)
    assert stats.eigval[0] > stats.eigval[1] > stats.eigval[2] > 0
    # Used as the paper's per-pixel mean subtraction: a batch's mean over the set becomes ~0.
    pre = stats.preprocess(mode="per_pixel", kind="cifar")
    x = torch.from_numpy(np.stack([np.asarray(stats.mean_image) * 255]).round().astype(np.uint8))
    assert pre.normalize(x).abs().max() < 0.5 / 255 + 1e-6
    path = save_stats(stats, tmp_path / "cifar10.pt")
    back = load_stats(path)
    assert back.eigvec == stats.eigvec and torch.equal(back.mean_image, stats.mean_image)
    assert back.lighting().eigval.tolist() == pytest.approx(stats.eigval)


def test_folder_stats_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    stats = compute_folder_stats(root, resize=32, crop_size=24, batch_size=4)
    assert stats.count == 6 and stats.mean_image.shape == (3, 24, 24)
    assert all(abs(m - 0.5) < 0.02 for m in stats.mean)  # uniform noise
    out = tmp_path / "s.pt"
    assert (
        main(["data", "stats", str(root), "--resize", "32", "--crop-size", "24", "--out", str(out)])
        == 0
    )
    assert "images: 6" in capsys.readouterr().out
    assert load_stats(out).count == 6
    with pytest.raises(DataError, match="reslab data stats"):
        load_stats(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "o.pt")
    with pytest.raises(DataError, match="not a reslab stats file"):
        DataStats.from_dict(torch.load(tmp_path / "o.pt", weights_only=True))


def test_download_keeps_a_readable_copy(cifar_root: Path) -> None:
    # The shared copy's digests differ from torchvision's: it must be read, not re-fetched.
    assert download_cifar(cifar_root) == cifar_root / "cifar-10-batches-py"


def test_download_failure_says_where_to_put_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real download from a closed local port: fails at once, as offline would.
    monkeypatch.setattr(datasets.CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(DataError) as e:
        download_cifar(tmp_path, dataset="cifar100")
    msg = str(e.value)
    assert f"{tmp_path / 'cifar-100-python'}/" in msg and "train, test, meta" in msg
    assert isinstance(e.value.__context__, (urllib.error.URLError, OSError, RuntimeError))
    # The directories it made for the download are not left behind, empty; existing ones stay.
    with pytest.raises(DataError):
        download_cifar(tmp_path / "new" / "data", dataset="cifar100")
    assert tmp_path.is_dir() and not (tmp_path / "new").exists()


class _Marker:
    def __reduce__(self):
        import os

        return (os.system, ("touch stats-code-ran",))


def test_a_bad_stats_file_is_one_clear_error_and_never_runs_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reslab.data.stats import load_stats

    monkeypatch.chdir(tmp_path)
    evil, noise, partial = tmp_path / "evil.pt", tmp_path / "noise.pt", tmp_path / "partial.pt"
    torch.save({"format": "reslab-stats", "mean_image": _Marker()}, evil)
    noise.write_bytes(bytes(range(256)) * 8)
    torch.save({"format": "reslab-stats", "mean_image": torch.zeros(3, 4, 4)}, partial)
    for path, needle in ((evil, "cannot be loaded safely"), (noise, "cannot be loaded safely"),
                         (partial, "is damaged (KeyError")):  # fmt: skip
        with pytest.raises(DataError, match=r"stats file .*" + re.escape(needle)) as e:
            load_stats(path)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "stats-code-ran").exists()


def test_folder_stats_and_check_read_the_training_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """DIR/CLASS/* beside DIR/val/CLASS/*: training never sees val/ as a class, so neither do
    `data check` and `data stats`; a file that fails to decode is left out of the statistics,
    not replaced by (and counted as) its neighbour."""
    root = tmp_path / "imgs"
    for split, value in (("", 40), ("val", 200)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((30, 30, 3), value + i, np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "1.png").write_bytes(good[: len(good) // 2])  # passes the header scan
    stats = compute_folder_stats(root, resize=24, crop_size=24, batch_size=4)
    assert stats.count == 5  # 6 training images, one truncated; none of val/
    want = (40 + 42 + 40 + 41 + 42) / 5 / 255  # cat 0, 2; dog 0, 1, 2 (cat/1.png truncated)
    assert abs(stats.mean[0] - want) < 1e-6
    assert main(["data", "check", str(root), "--min-size", "24"]) == 0
    out = capsys.readouterr().out
    assert "training set:" in out and f"validation set ({root / 'val'}):" in out
    train_part = out.split("validation set")[0]
    assert "  val " not in train_part and "cat" in train_part and "dog" in train_part
