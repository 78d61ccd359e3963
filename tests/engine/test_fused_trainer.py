"""Fused training of K seeds on real CIFAR-10 subsets: each member is the run it would be alone.

The exactness tests run in float64 (torch's default dtype set for the test: model weights and
loader batches follow it). In float32 a member and its separate run drift apart within a few
iterations exactly as one net does against itself in another memory layout (measured: NCHW vs
NHWC gradients of the same ResNet-20 differ by up to 6e-3 relative at init, from ReLU inputs
within rounding of 0), so float32 cannot tell a wrong fused net from a right one; float64 can
(measured here: 1e-13 after 24 iterations, against ~1 when anything differs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from reslab.engine.config import TrainConfig
from reslab.engine.eval_run import load_checkpoint_model
from reslab.engine.fused_trainer import check_members, recover_commit, train_fused
from reslab.engine.trainer import train
from reslab.runtime.checkpoint import load_checkpoint


def _cfg(root: Path, out: Path, seed: int, **kw) -> TrainConfig:
    base = dict(
        model="resnet20", data=str(root), out=str(out), device="cpu", precision="fp32",
        val_split=False, train_subset=64, eval_subset=32, eval_splits=["test"], batch_size=16,
        iters=6, eval_every=3, save_every=3, log_every=1, seed=seed, milestones=[4],
        weight_decay=1e-3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _assert_same_run(a: Path, b: Path, *, tol: float) -> None:
    """Two run directories hold the same run: weights, SGD state, loader position, metrics."""
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["step"] == cb["step"] and ca["data_state"] == cb["data_state"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=tol, atol=tol, msg=k)
    # Fused SGD is the separate SGD: momentum buffers (weight decay inside) agree too.
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert (
        sa.keys() == sb.keys()
        and ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    )
    for i in sa:
        torch.testing.assert_close(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"],
                                   rtol=tol, atol=tol)  # fmt: skip
    ta, tb = ca["train_state"], cb["train_state"]
    assert ta["warmup_ended_at"] == tb["warmup_ended_at"]
    ra = [json.loads(r) for r in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(r) for r in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["lr"], r["test_error"]) for r in ra] == [
        (r["iter"], r["lr"], r["test_error"]) for r in rb
    ]
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=tol)


def test_member_trained_fused_equals_trained_alone(
    cifar_root: Path, tmp_path: Path, float64: None
) -> None:
    seeds = (3, 8)
    finals = train_fused([_cfg(cifar_root, tmp_path / f"fused-s{s}", s) for s in seeds],
                         progress=False)  # fmt: skip
    assert [f["iter"] for f in finals] == [6, 6]
    for s in seeds:
        train(_cfg(cifar_root, tmp_path / f"alone-s{s}", s), progress=False)
        _assert_same_run(tmp_path / f"fused-s{s}", tmp_path / f"alone-s{s}", tol=1e-10)
        assert json.loads((tmp_path / f"fused-s{s}" / "final.json").read_text())["iter"] == 6
    # Different seeds are different nets (the test would pass trivially otherwise).
    a = load_checkpoint(tmp_path / "fused-s3" / "last.pt")["model"]["conv1.weight"]
    b = load_checkpoint(tmp_path / "fused-s8" / "last.pt")["model"]["conv1.weight"]
    assert (a - b).abs().max() > 0.1
    # A member's checkpoint is an ordinary single-net one (what `reslab eval` loads).
    loaded = load_checkpoint_model(tmp_path / "fused-s8" / "last.pt", device="cpu")
    assert type(loaded.model).__name__ == "CifarResNet"


def test_members_whose_copy_fails_are_evaluated_unfolded(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Members evaluate through Trainer._eval_model too: a failing folded copy is said once per
    member and the fused run still finishes with every member's files."""
    import reslab.engine.eval_run as eval_run

    def fail(model, device):
        raise TypeError("cannot pickle '_thread.lock' object")

    monkeypatch.setattr(eval_run, "fast_eval_model", fail)
    outs = [tmp_path / f"m{s}" for s in (1, 2)]
    finals = train_fused([_cfg(cifar_root, o, s) for o, s in zip(outs, (1, 2), strict=True)],
                         progress=False)  # fmt: skip
    assert [f["iter"] for f in finals] == [6, 6]
    assert all((o / "last.pt").is_file() for o in outs)
    err = capsys.readouterr().err
    for o in outs:
        assert err.count(f"{o}: evaluating the model unfolded") == 1


@pytest.mark.slow
def test_per_member_resnet110_warmup_equals_alone(
    cifar_root: Path, tmp_path: Path, float64: None
) -> None:
    """lr 0.01 until each member's own training error is below the threshold (20-step check)."""
    kw = dict(iters=24, eval_every=12, save_every=12, warmup_lr=0.01, warmup_until_error=99.0,
              milestones=[])  # fmt: skip
    seeds = (0, 1)
    train_fused([_cfg(cifar_root, tmp_path / f"f{s}", s, **kw) for s in seeds], progress=False)
    for s in seeds:
        train(_cfg(cifar_root, tmp_path / f"a{s}", s, **kw), progress=False)
        _assert_same_run(tmp_path / f"f{s}", tmp_path / f"a{s}", tol=1e-10)
        rows = [
            json.loads(r) for r in (tmp_path / f"f{s}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["lr"] for r in rows] == [0.01, 0.1]


_SCRIPT = """
import sys, torch
from reslab.engine.config import TrainConfig
from reslab.engine.fused_trainer import train_fused
root, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cfgs = [TrainConfig(model="resnet20", data=root, out=f"{out}/s{s}", device="cpu",
        precision="fp32", val_split=False, train_subset=96, eval_subset=32,
        eval_splits=["test"], batch_size=16, iters=36, eval_every=12, save_every=3,
        log_every=3, milestones=[20], seed=s) for s in (0, 1)]
train_fused(cfgs, resume=resume, progress=False)
"""


@pytest.mark.slow  # ~40 s: a reference run and up to five killed/resumed processes
def test_resume_after_sigkill_is_bit_identical(
    cifar_root: Path, tmp_path: Path, kill_and_resume
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def cmd(out: Path, resume: bool) -> list[str]:
        return [sys.executable, "-c", _SCRIPT, str(cifar_root), str(out), "1" if resume else "0"]

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref, False), env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    kills, resumes = kill_and_resume(lambda r: cmd(out, r), watch=out / "s0" / "last.pt",
                                     kills=4, env=env)  # fmt: skip
    assert kills == 4 and resumes == 4
    for s in ("s0", "s1"):
        a = load_checkpoint(ref / s / "last.pt")
        b = load_checkpoint(out / s / "last.pt")
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (s, k)
        assert a["data_state"] == b["data_state"]
        strip = lambda rows: [r.split('"images_per_s"')[0] for r in rows]  # noqa: E731
        assert strip((ref / s / "metrics.jsonl").read_text().splitlines()) == strip(
            (out / s / "metrics.jsonl").read_text().splitlines()
        )


def test_interrupted_two_phase_save_is_finished_or_undone(cifar_root: Path, tmp_path: Path) -> None:
    outs = [tmp_path / "s0", tmp_path / "s1"]
    cfgs = lambda iters: [_cfg(cifar_root, o, i, iters=iters) for i, o in enumerate(outs)]  # noqa: E731
    train_fused(cfgs(3), progress=False)
    old = [load_checkpoint(o / "last.pt") for o in outs]
    for o in outs:
        shutil.copy(o / "last.pt", o / "old.pt")
    train_fused(cfgs(6), resume=True, progress=False)
    # Killed in phase 1: member 0's next file written, member 1's not -> undone.
    for o in outs:
        shutil.copy(o / "last.pt", o / "new.pt")
        shutil.copy(o / "old.pt", o / "last.pt")
    shutil.copy(outs[0] / "new.pt", outs[0] / "last.next.pt")
    recover_commit(outs)
    assert not (outs[0] / "last.next.pt").exists()
    assert [load_checkpoint(o / "last.pt")["step"] for o in outs] == [3, 3]
    # Killed in phase 2: member 0 renamed, member 1's next file still waiting -> finished.
    shutil.copy(outs[0] / "new.pt", outs[0] / "last.pt")
    shutil.copy(outs[1] / "new.pt", outs[1] / "last.next.pt")
    recover_commit(outs)
    assert [load_checkpoint(o / "last.pt")["step"] for o in outs] == [6, 6]
    assert not (outs[1] / "last.next.pt").exists()
    assert old[0]["step"] == 3


def test_refuses_mixed_members_and_overwriting(cifar_root: Path, tmp_path: Path) -> None:
    a = _cfg(cifar_root, tmp_path / "a", 0)
    with pytest.raises(ValueError, match=r"differ only in seed and out.*lr"):
        check_members([a, _cfg(cifar_root, tmp_path / "b", 1, lr=0.2)])
    with pytest.raises(ValueError, match="distinct run directories"):
        check_members([a, _cfg(cifar_root, tmp_path / "a", 1)])
    cfgs = [_cfg(cifar_root, tmp_path / f"r{s}", s, iters=1, eval_every=1) for s in (0, 1)]
    train_fused(cfgs, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_fused(cfgs, progress=False)


def test_a_member_continues_alone_from_its_fused_checkpoint(
    cifar_root: Path, tmp_path: Path, float64: None
) -> None:
    """What the runner falls back to (a diverged sibling, members at different iterations)."""
    cfgs = lambda d, it: [_cfg(cifar_root, tmp_path / d / f"s{s}", s, iters=it) for s in (0, 1)]  # noqa: E731
    train_fused(cfgs("fused", 6), progress=False)
    train_fused(cfgs("split", 3), progress=False)
    train(cfgs("split", 6)[1], resume=True, progress=False)
    _assert_same_run(tmp_path / "split" / "s1", tmp_path / "fused" / "s1", tol=1e-10)


def test_time_limit_counts_this_call_only(cifar_root: Path, tmp_path: Path) -> None:
    """As for one net (tests/engine/test_trainer.py): the limit is each call's, so a stopped
    fused run resumed with time to spare runs to the end, not one more iteration."""
    from reslab.runtime.checkpoint import save_atomic

    outs = [tmp_path / "s0", tmp_path / "s1"]
    cfgs = lambda limit: [_cfg(cifar_root, o, i, time_limit=limit) for i, o in enumerate(outs)]  # noqa: E731
    train_fused(cfgs(1e-9), progress=False)  # stops after the first iteration
    for o in outs:
        ckpt = load_checkpoint(o / "last.pt")
        assert ckpt["step"] == 1
        ckpt["train_state"]["wall"] = 1e6  # as if the calls before had trained for days
        save_atomic(ckpt, o / "last.pt")
    train_fused(cfgs(600.0), resume=True, progress=False)
    assert [load_checkpoint(o / "last.pt")["step"] for o in outs] == [6, 6]


def test_a_ctrl_c_swallowed_inside_a_step_still_stops_the_fused_run(
    cifar_root: Path, tmp_path: Path, swallowed_sigint
) -> None:
    """As for a single run (tests/engine/test_hardening.py): SIGINT whose KeyboardInterrupt
    lands in code that swallows it (a forward hook's try/except here) stops the fused run at
    its next step, and Python's own handler is put back."""
    import signal

    from reslab.models import fused

    calls = swallowed_sigint(fused.FusedCifarNet, 2)
    with pytest.raises(KeyboardInterrupt):
        train_fused([_cfg(cifar_root, tmp_path / f"s{s}", s) for s in (0, 1)], progress=False)
    assert calls[0] == 2  # not one step more
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
