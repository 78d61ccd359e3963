"""scripts/cpu_kind_check.sh: issue 17's measurements for one CPU kind in one command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cpu_kind_check.sh"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable, **(env or {})})  # fmt: skip


def test_a_directory_without_cifar_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = run(str(tmp_path), env={"OUT": str(tmp_path / "out")})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "cifar-10-batches-py not found" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


@pytest.mark.slow  # three cold torch.compile builds and two benchmark passes: ~4 min on 2 cores
def test_tiny_settings_record_every_step(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "kind"
    r = run(str(cifar_root), env={"OUT": str(out), "STEPS": "2", "ROUNDS": "1", "RSTEPS": "1",
                                  "MODELS56": "0"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    steps = (out / "steps.txt").read_text().splitlines()
    assert [s.split()[0] for s in steps] == ["train-r20-b128", "train-r20-b256", "sizes",
                                              "compile-r20"]  # fmt: skip
    assert all(" rc=0 " in s for s in steps), steps
    cpu = (out / "cpu.txt").read_text()
    assert re.search(r"CPU .+, \w+ \((amx_bf16|avx512_bf16|no native bf16)", cpu), cpu
    train = (out / "train-r20-b128.txt").read_text()
    # the two targets of issue 17 in one unit, and the ceiling the convolutions set
    assert re.search(r"4x the reference = \d+ img/s = \d+% of the measured bf16 peak", train)
    assert re.search(r"ceiling \d+ img/s = [\d.]+x the reference", train)
    assert "compiled / eager = x" in (out / "compile-r20.txt").read_text()
