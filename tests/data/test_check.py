"""`reslab data check` on CIFAR directories: the truth, or an error naming the bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from reslab.cli import main
from reslab.data.stats import cifar_datasets


def _batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)


def test_check_names_the_bad_cifar_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    good = np.zeros((10, 3072), np.uint8)
    for i in range(1, 6):
        _batch(d / f"data_batch_{i}", good, list(range(10)))
    _batch(d / "test_batch", good, [0, 1, 2, 3, 4, 5, 6, 7, 8, 12])  # label out of range
    assert cifar_datasets(tmp_path) == [("cifar10", tmp_path)] == cifar_datasets(d)
    assert main(["data", "check", str(d)]) == 2
    err = capsys.readouterr().err
    assert "test_batch" in err and "0..9" in err
    _batch(d / "test_batch", np.zeros((10, 1000), np.uint8), list(range(10)))  # wrong shape
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "test_batch" in capsys.readouterr().err
    _batch(d / "test_batch", good, list(range(10)))
    (d / "data_batch_3").unlink()
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "data_batch_3" in capsys.readouterr().err


def test_check_counts_a_small_cifar_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    for i in range(1, 6):
        _batch(
            d / f"data_batch_{i}", np.zeros((2000, 3072), np.uint8), [k % 10 for k in range(2000)]
        )
    _batch(d / "test_batch", np.zeros((30, 3072), np.uint8), [k % 10 for k in range(30)])
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train: 10000 images" in out and "test: 30 images" in out
    assert out.count("1000 /      3") == 10 and "train45k 5000 / val5k 5000" in out
