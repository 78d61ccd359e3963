"""Shared fixtures. CIFAR-10 comes from $RESLAB_DATA: set but missing is a failure, unset skips."""

from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread per test process (and per subprocess it starts): the test workloads are
# tiny, and two OpenMP threads stall at every barrier whenever the other core is busy (measured
# here: a 40-step ResNet-20 run took 38-88 s with 2 threads on a loaded machine, 5 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = os.environ.get("RESLAB_DATA")
    if not root:
        pytest.skip("RESLAB_DATA is not set (a directory holding cifar-10-batches-py)")
    path = Path(root)
    if not (path / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.fail(
            f"RESLAB_DATA={root} but {path / 'cifar-10-batches-py'} has no CIFAR-10 batches"
        )
    return path


@pytest.fixture(scope="session")
def cifar_test_images(cifar_root: Path) -> tuple[torch.Tensor, list[int]]:
    """The first 64 CIFAR-10 test images as uint8 [64, 3, 32, 32] and their labels, read straight
    from the python pickle (no reslab code involved)."""
    import pickle

    import numpy as np

    with (cifar_root / "cifar-10-batches-py" / "test_batch").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"][:64], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.copy()), list(batch[b"labels"][:64])


def _kill_and_resume(
    cmd, *, watch: Path, kills: int, seed: int = 0, env: dict | None = None
) -> tuple[int, int]:
    """Run `cmd(resume)` until it finishes, SIGKILLing it `kills` times at random moments:
    each time a random 0-0.4 s after `watch` (the run's last.pt) was rewritten, so that the
    kill lands mid-training (often mid-write of the next checkpoint) however loaded the
    machine is. Returns (kills made, resumes made); the last attempt runs to the end."""
    import random
    import signal
    import subprocess
    import time

    rng = random.Random(seed)
    made = resumed = 0
    while True:
        resume = watch.exists()
        resumed += resume
        before = watch.stat().st_mtime_ns if resume else None
        proc = subprocess.Popen(cmd(resume), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # fmt: skip
        if made < kills:
            while proc.poll() is None:  # wait for a checkpoint written by this process
                if watch.exists() and watch.stat().st_mtime_ns != before:
                    time.sleep(rng.uniform(0.0, 0.4))
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                made += 1
                continue
        proc.wait()
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
        return made, resumed


@pytest.fixture
def kill_and_resume():
    return _kill_and_resume


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, whatever this process inherited: a shell that
    starts a job in the background (`cmd &`) hands it SIGINT ignored, and Python then keeps it
    ignored, as `reslab train` does (a CI run started so had the SIGINT tests fail)."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture
def swallowed_sigint(python_sigint, monkeypatch: pytest.MonkeyPatch):
    """swallowed_sigint(cls, at_call) -> [calls]: every `cls` module built afterwards counts its
    forward calls in a hook that, at call `at_call`, sends this process SIGINT and swallows the
    KeyboardInterrupt (as a __del__ or a callback may in the wild)."""
    import signal

    def arm(cls: type, at_call: int) -> list[int]:
        calls = [0]

        def hook(mod, inp, out):
            calls[0] += 1
            if calls[0] == at_call:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(1000):  # the handler runs between bytecodes
                        pass
                except KeyboardInterrupt:
                    pass  # swallowed

        orig = cls.__init__

        def init(self, *a, **k):
            orig(self, *a, **k)
            self.register_forward_hook(hook)

        monkeypatch.setattr(cls, "__init__", init)
        return calls

    return arm
