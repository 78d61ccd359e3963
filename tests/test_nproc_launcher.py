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


@pytest.mark.parametrize(("code", "said", "rc"), [(2, None, 2), (3, "exited with code 3", 3),
                                                  (-9, "was killed by SIGKILL", 137)])  # fmt: skip
def test_a_failed_worker_ends_torchrun_in_one_line_and_its_exit_code(
    tmp_path: Path, code: int, said: str | None, rc: int
) -> None:
    """torchrun had ended every failed --nproc run in ChildFailedError's traceback and failure
    table, with exit code 1 even where the worker had said why and exited 2 (bad input)."""
    from reslab.cli import _TORCHRUN

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys\n"
        "if os.environ['LOCAL_RANK'] == '1':\n"
        f"    os.kill(os.getpid(), signal.SIGKILL) if {code} < 0 else sys.exit({code})\n"
    )
    r = subprocess.run([sys.executable, "-c", _TORCHRUN, "--standalone", "--nproc-per-node=2",
                        str(worker)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == rc, r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    if said is None:
        assert lines == [], r.stderr  # the worker's own line is the only one (here: none)
    else:
        assert len(lines) == 1 and f"worker 1 of the --nproc run {said}" in lines[0], r.stderr


def test_nproc_refuses_missing_data_once_before_starting_workers(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "reslab", "train", "--nproc", "2", "--data",
                        str(tmp_path / "nowhere"), "--iters", "1", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "nowhere does not exist" in errors[0], r.stderr
    assert r.stderr.count("lr milestones scaled") == 1  # the launcher's notes, not each worker's
    assert not (tmp_path / "run").exists()


def test_nproc_says_its_configuration_notes_once(cifar_root: Path, tmp_path: Path) -> None:
    """The launcher reads the configuration first and says its notes; its workers had said
    them again (rank 0 the milestones, every rank the recipe chosen for a folder)."""
    r = subprocess.run([sys.executable, "-m", "reslab", "train", "--recipe", "cifar10-paper",
                        "--iters", "2", "--batch-size", "32", "--set", "train_subset=64",
                        "--set", "eval_subset=32", "--threads", "1", "--precision", "fp32",
                        "--data", str(cifar_root), "--nproc", "2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("lr milestones scaled") == 1, r.stderr
    assert (
        "OMP_NUM_THREADS" not in r.stderr
    )  # torchrun's banner: the launcher sets it as torchrun would
