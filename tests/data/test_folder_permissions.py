"""Folders and images that cannot be read (permission denied) are named as such: a class folder
is an error (it would otherwise train as an empty class), an image a skip reason of its own.

Root bypasses file permissions, so the real test runs the CLI in a subprocess without the DAC
capabilities (setpriv); the unit tests make the OS call fail with a monkeypatch instead."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reslab
from reslab.data.cifar import DataError
from reslab.data.folder import _SKIP_CODES, _code, list_samples, scan_folder
from reslab.data.images import read_header

_SRC = str(Path(reslab.__file__).resolve().parents[1])


def _pngs(d: Path, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(d)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")


def _three_classes(root: Path) -> Path:
    for c in ("bird", "cat", "dog"):
        _pngs(root / c, 3)
    return root


def _unprivileged(tmp_path: Path) -> list[str] | None:
    """A command prefix under which chmod 000 denies reading: none for an ordinary user; for
    root, setpriv without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH. None when neither works."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        r = subprocess.run([*prefix, "cat", str(probe)], capture_output=True, timeout=30)
    except OSError:
        return None
    return prefix if r.returncode != 0 else None  # read anyway: the caps could not be dropped


# Runs in the unprivileged child: several CLI calls in one process (torch imports once).
_CHILD = """
import contextlib, io, json, sys
from reslab.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    out.append([rc, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


def _reslab(prefix: list[str], *calls: list[str]) -> list[tuple[int, str, str]]:
    import json

    env = {**os.environ, "PYTHONPATH": _SRC, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*prefix, sys.executable, "-c", _CHILD, json.dumps(calls)],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return [tuple(x) for x in json.loads(r.stdout.splitlines()[-1])]


def test_unreadable_class_folder_and_image_for_real(tmp_path: Path) -> None:
    prefix = _unprivileged(tmp_path)
    if prefix is None:
        pytest.skip("cannot drop the privilege to read any file (root without setpriv)")
    files = _three_classes(tmp_path / "files")
    folder = _three_classes(tmp_path / "folder")
    top = _three_classes(tmp_path / "top")
    locked = [files / "cat" / "2.png", folder / "dog", top]
    for p in locked:
        p.chmod(0)
    try:
        results = _reslab(
            prefix,
            ["data", "check", "--quick", str(files)],
            ["data", "check", str(folder)],
            ["data", "stats", str(folder)],
            ["train", "--model", "resnet18", "--data", str(folder), "--out",
             str(tmp_path / "run"), "--device", "cpu", "--iters", "1"],
            ["data", "check", str(top)],
        )  # fmt: skip
    finally:
        for p in locked:
            p.chmod(0o755)
    rc, out, err = results[0]
    assert rc == 0, err
    assert f"{files / 'cat' / '2.png'}: permission denied" in out
    assert "1 skipped (1 permission denied)" in out and "corrupt header" not in out
    want = f"permission denied: {folder / 'dog'}; fix its permissions (chmod) or remove it"
    for rc, _, err in results[1:4]:
        assert rc == 2 and want in err and "Traceback" not in err, err
    rc, _, err = results[4]
    assert rc == 2 and f"permission denied: {top}; fix its permissions" in err, err


def test_unlistable_class_folder_is_an_error(tmp_path: Path, monkeypatch) -> None:
    root = _three_classes(tmp_path / "perm")
    real = os.scandir

    def scandir(path="."):
        if Path(path) == root / "dog":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"^permission denied: .*dog; fix its permissions"):
        list_samples(root)


def test_unreadable_image_is_counted_as_permission_denied(tmp_path: Path, monkeypatch) -> None:
    root = _three_classes(tmp_path / "perm")
    bad = str(root / "cat" / "1.png")
    real = builtins.open

    def opener(file, *a, **k):
        if os.fspath(file) == bad:
            raise PermissionError(13, "Permission denied", bad)
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", opener)
    with pytest.raises(Exception) as e:
        read_header(bad)
    assert e.value.reason.startswith("permission denied")  # type: ignore[attr-defined]
    report = scan_folder(root, warn=False)
    assert [b.path for b in report.bad] == [bad]
    assert "1 skipped (1 permission denied)" in report.summary()
    assert f"{bad}: permission denied" in report.format()
    # A file that fails only later, inside a DataLoader worker, keeps the reason too.
    assert _SKIP_CODES[_code(report.bad[0].reason)] == "permission denied"
