"""What a command imports: CIFAR training and evaluation never meet torchvision (its import pulls
torch._dynamo in through torchvision.ops: ~0.9 s of every such command on 2 cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_cifar_train_and_eval_do_not_import_torchvision(cifar_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # `reslab eval` writes its confusion matrix as a PNG
    out = tmp_path / "run"
    train = [
        "train", "--model", "resnet20", "--data", str(cifar_root), "--out", str(out),
        "--device", "cpu", "--iters", "2", "--eval-every", "2", "--set", "train_subset=64",
        "--set", "eval_subset=64", "--set", "batch_size=32", "--set", "eval_splits=[test]",
        "--set", "val_split=false", "--set", "eval_views=flip-shift",
    ]  # fmt: skip
    evaluate = ["eval", "--checkpoint", str(out / "last.pt"), "--data", str(cifar_root),
                "--limit", "64", "--views", "flip", "--out", str(tmp_path / "eval")]  # fmt: skip
    code = (
        "import sys\nfrom reslab.cli import main\n"
        f"assert main({train!r}) == 0\nassert main({evaluate!r}) == 0\n"
        "print('torchvision imported:', 'torchvision' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torchvision imported: False" in r.stdout
    # and an image-folder transform still finds it where it is needed
    from reslab.data.transforms import center_crop_transform

    assert type(center_crop_transform()).__module__.startswith("torchvision")


def test_run_records_torchvision_version_without_importing_it() -> None:
    code = (
        "import sys\nfrom reslab.engine.trainer import run_info\n"
        "v = run_info()['torchvision']\nprint('imported:', 'torchvision' in sys.modules)\n"
        "import torchvision\nprint('equal:', v == torchvision.__version__, v)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported: False" in r.stdout and "equal: True" in r.stdout, r.stdout
