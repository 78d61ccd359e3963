"""scripts/compile_ab.sh: eager vs --compile as whole `reslab train` runs, alternating."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compile_ab.sh"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable, **(env or {})})  # fmt: skip


def test_a_directory_without_cifar_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = run(str(tmp_path), str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "cifar-10-batches-py not found" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a cold torch.compile of two shapes: ~2-3 min on 2 cores
def test_one_tiny_round_prints_both_phases_and_keeps_no_weights(cifar_root: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "ab"
    r = run(str(cifar_root), str(out), env={"ROUNDS": "1", "ITERS": "80"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.findall(r"^1 (no-compile|compile) rc=0 wall=\d+$", r.stdout, re.M) == [
        "no-compile", "compile"]  # fmt: skip
    for size in ("24x24", "32x32"):
        assert re.search(rf"^{size}: compiled / eager = x[\d.]+ \(medians \d+ / \d+", r.stdout,
                         re.M), r.stdout  # fmt: skip
    assert not list(out.rglob("*.pt"))
    cfg = (out / "r1-compile" / "config.yaml").read_text()
    assert "compile: true" in cfg and "small_until: 0.5" in cfg
