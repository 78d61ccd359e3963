"""`reslab models`: exact counts from meta-device models, served from a cache without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reslab.analysis.complexity import count_macs, count_params
from reslab.analysis.zoo import compute_rows
from reslab.models import create_model


def test_meta_counts_equal_counts_of_real_models() -> None:
    rows = {r["name"]: r for r in compute_rows()}
    for name, size in (("resnet20", 32), ("resnet18", 224), ("alexnet_cifar", 32)):
        real = create_model(name)
        assert rows[name]["params"] == count_params(real)
        assert rows[name]["macs"] == count_macs(real, size)
    assert rows["resnet18"]["shortcut"] == "B" and rows["plain18"]["shortcut"] == "none"


def test_cached_listing_skips_torch_and_labels_resnet18_option_a(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = (
        "import sys\nfrom reslab.cli import main\nmain(['models'])\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "reslab" / "zoo.json").is_file()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "torch imported: False" in second.stdout
    assert second.stdout.replace("torch imported: False", "") == first.stdout.replace(
        "torch imported: True", ""
    )
    row = next(ln for ln in second.stdout.splitlines() if ln.startswith("resnet18 "))
    assert "B" in row.split() and row.endswith("27.88 (A)")
    assert "option A (Table 2)" in second.stdout


@pytest.mark.parametrize("argv", [["--version"]])
def test_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from reslab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("reslab 0.")
    assert torch.__version__  # the library still imports torch where it is used
