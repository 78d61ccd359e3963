"""`reslab reproduce` and the folders it is given: a run copied in without its config.yaml, and an
--out or --runs that cannot be written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_jobs_worker_is_one_line_and_the_same_command_goes_on(
    cifar_root: Path, tmp_path: Path
) -> None:
    """SIGKILL of one --jobs worker (as the out-of-memory killer would) had ended reproduce in a
    BrokenProcessPool traceback."""
    cmd = [sys.executable, "-m", "reslab", "reproduce", "table6", "--budget", "cpu", "--only",
           "resnet20-s0,resnet32-s0", "--jobs", "2", "--time-limit", "120", "--out",
           str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--data", str(cifar_root),
           "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs").rglob("config.yaml")):  # a worker has begun a run
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = [int(p) for p in _children(proc.pid) if b"spawn_main" in _cmdline(int(p))]
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("reslab reproduce: error: a worker process")
    assert "the same command goes on" in err


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_damaged_run_config_is_refused_before_any_run_trains(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    """A damaged config.yaml in the second run's folder had been found only at its turn, after
    the first run had trained, in a line with no fix (helper audit D, bug 6)."""
    runs = tmp_path / "runs"
    bad = runs / "smoke" / "resnet32-s0"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("garbage: [\n")
    argv = ["reproduce", "table6", "--budget", "smoke", "--out", str(tmp_path / "out"), "--runs",
            str(runs), "--data", str(cifar_root), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad / "config.yaml") in err
    assert f"delete {bad} to train that run again" in err
    assert not any(runs.rglob("last.pt"))  # nothing trained


def test_a_reports_leftover_temporaries_are_removed_by_the_next_call(
    cifar_root: Path, tmp_path: Path
) -> None:
    """A kill while the report was written had left .REPORT.md.XXXX.tmp (and a figure's, a
    record's) in OUT for good, to be committed with the report (helper audit D, bug 5)."""
    out = tmp_path / "out"
    argv = ["reproduce", "table6", "--budget", "smoke", "--out", str(out), "--data",
            str(cifar_root), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    left = [out / ".REPORT.md.k1ll3d.tmp", out / ".table6.png.x.tmp",
            next((out / "records").iterdir()) / ".config.yaml.y.tmp"]  # fmt: skip
    for p in left:
        p.write_text("partial")
    assert main(argv) == 0  # (every run reused)
    assert not [p for p in left if p.exists()] and (out / "REPORT.md").is_file()
