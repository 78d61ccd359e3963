"""`reslab reproduce` and the folders it is given: a run copied in without its config.yaml, and an
--out or --runs that cannot be written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reslab.cli import main
from reslab.experiments import table6
from reslab.experiments.runner import ConfigMismatch, Context, run_one


def test_a_finished_run_without_config_yaml_is_checked_against_its_checkpoint(
    cifar_root: Path, tmp_path: Path
) -> None:
    """A finished ResNet-20 run in resnet32-s0's folder, its config.yaml gone, had been reused as
    ResNet-32 (skipped, its numbers reported as ResNet-32's)."""
    runs = tmp_path / "runs"
    ctx = Context("table6", "smoke", tmp_path, runs, 1, str(cifar_root), "cpu", "",
                  progress=False)  # fmt: skip
    r20, r32 = table6.plan(ctx).specs[:2]
    for spec in (r20, r32):
        spec.cfg.data, spec.cfg.device = str(cifar_root), "cpu"
    run_one(r20, runs_root=runs, progress=False)
    shutil.copytree(runs / r20.name, runs / r32.name)
    (runs / r32.name / "config.yaml").unlink()
    with pytest.raises(ConfigMismatch, match="model: 'resnet20' there, 'resnet32' now"):
        run_one(r32, runs_root=runs, progress=False)


@pytest.mark.parametrize("flag", ["--out", "--runs"])
def test_an_unwritable_folder_is_refused_before_training(
    cifar_root: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    """A read-only --out had failed with a traceback (an existing one only at the report, after
    every run had trained)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # os.access, as a read-only mount answers it (root passes a chmod, so it cannot stand in)
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == locked else real(p, m))
    out = locked if flag == "--out" else tmp_path / "out"
    argv = ["reproduce", "table6", "--budget", "smoke", "--out", str(out), "--data",
            str(cifar_root), "--device", "cpu", "--quiet"]  # fmt: skip
    if flag == "--runs":
        argv += ["--runs", str(locked / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{flag} {out if flag == '--out' else locked}" in err
    assert "not writable" in err and "Traceback" not in err
    assert not any(tmp_path.rglob("last.pt"))  # nothing trained


def test_an_os_error_during_the_call_is_one_line(
    cifar_root: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reslab.experiments.runner as runner

    def fail(*a, **k):
        raise OSError(30, "Read-only file system", str(tmp_path / "out" / "table6.png"))

    monkeypatch.setattr(runner, "reproduce", fail)
    argv = ["reproduce", "table6", "--budget", "smoke", "--out", str(tmp_path / "out"),
            "--data", str(cifar_root), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"reslab reproduce: error: Read-only file system "
                           f"({tmp_path / 'out' / 'table6.png'})")  # fmt: skip
