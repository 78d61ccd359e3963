"""`reslab train --nproc N` runs torchrun in a child process: stopping the launcher stops the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _processes_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_stops_torchrun_and_its_workers(
    cifar_root: Path, tmp_path: Path, sig: int
) -> None:
    """A SIGTERM (`timeout`, `kill PID`) or SIGKILL of the launcher alone had left torchrun and the
    workers training in the background, holding the run directory."""
    out = tmp_path / "nproc-run"
    cmd = [sys.executable, "-m", "reslab", "train", "--recipe", "cifar10-paper", "--model",
           "resnet20", "--iters", "100000", "--batch-size", "32", "--set", "train_subset=256",
           "--set", "eval_subset=64", "--set", "eval_every=100000", "--threads", "1",
           "--precision", "fp32", "--data", str(cifar_root), "--nproc", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_processes_naming(str(out))) < 4:  # launcher, torchrun, two workers
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        launcher.send_signal(sig)
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _processes_naming(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_naming(str(out)) == []
    finally:
        for pid in _processes_naming(str(out)):  # whatever the test leaves, it ends
            os.kill(pid, signal.SIGKILL)


def test_a_worker_whose_peer_died_says_resume_continues_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """When another process of a --nproc run dies, this one's collective fails (gloo: the
    connection closed): one line saying that --resume continues the run, not a traceback
    through backward(); the same error outside a distributed run is raised as before."""
    import reslab.engine.trainer as trainer
    from reslab.cli import main

    def lost(*a, **k):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1")

    monkeypatch.setattr(trainer, "train", lost)
    argv = ["train", "--model", "resnet20", "--iters", "2", "--out", str(tmp_path / "r"),
            "--data", str(tmp_path)]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].startswith("reslab train: error: a collective of this 2-process run failed")
    assert lines[0].endswith("the same command with --resume continues it")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main(argv)
