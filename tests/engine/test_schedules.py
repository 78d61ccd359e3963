"""Schedules are pure functions of the iteration; the ResNet-110 warm-up returns to 0.1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reslab.engine.schedules import cosine_lr, linear_lr, lr_at, make_sgd, set_lr, step_lr

PAPER = dict(schedule="step", base=0.1, milestones=[32000, 48000], gamma=0.1, total=64000)


def test_section_4_2_step_schedule() -> None:
    assert lr_at(0, **PAPER) == 0.1
    assert lr_at(31999, **PAPER) == 0.1
    assert lr_at(32000, **PAPER) == pytest.approx(0.01)
    assert lr_at(47999, **PAPER) == pytest.approx(0.01)
    assert lr_at(48000, **PAPER) == pytest.approx(0.001)
    assert lr_at(63999, **PAPER) == pytest.approx(0.001)


def test_resnet110_warmup_returns_to_0_1() -> None:
    """lr 0.01 until the training error falls below 80% (at `warmup_ended_at`), then 0.1 —
    not the 0.01 a well-known re-implementation keeps."""
    kw = dict(PAPER, warmup_lr=0.01)
    assert lr_at(0, **kw, warmup_ended_at=None) == 0.01
    assert lr_at(10_000, **kw, warmup_ended_at=None) == 0.01  # still warming up
    assert lr_at(399, **kw, warmup_ended_at=400) == 0.01
    assert lr_at(400, **kw, warmup_ended_at=400) == 0.1
    assert lr_at(20_000, **kw, warmup_ended_at=400) == 0.1
    assert lr_at(32_000, **kw, warmup_ended_at=400) == pytest.approx(0.01)


@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_step_lr_is_monotone_non_increasing(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert step_lr(hi, base=0.1, milestones=[32000, 48000]) <= step_lr(
        lo, base=0.1, milestones=[32000, 48000]
    )


def test_cosine_warmup_and_end() -> None:
    assert cosine_lr(0, base=1.0, total=100, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(9, base=1.0, total=100, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, base=1.0, total=100, warmup=10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, schedule="poly", base=0.1, milestones=[], gamma=0.1, total=1)


@given(st.integers(0, 1000), st.integers(0, 1000))
def test_linear_decay_ramps_up_then_falls_to_zero(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    kw = dict(base=0.2, total=1000, warmup=100)
    assert linear_lr(99, **kw) == pytest.approx(0.2) and linear_lr(1000, **kw) == 0.0
    assert linear_lr(550, **kw) == pytest.approx(0.1)  # halfway down after the warm-up
    if lo >= 99:
        assert linear_lr(hi, **kw) <= linear_lr(lo, **kw)
    else:
        assert linear_lr(lo, **kw) <= linear_lr(min(hi, 99), **kw)
    at = lr_at(hi, schedule="linear", base=0.2, milestones=[], gamma=0.1, total=1000,
               warmup_iters=100)  # fmt: skip
    assert at == linear_lr(hi, **kw)


def test_sgd_groups_head_lr_and_set_lr() -> None:
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(3, 3))
    model.add_module("fc", torch.nn.Linear(3, 2))
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0, head="fc")
    set_lr(opt, 0.01)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.01, 0.1])
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    with pytest.raises(ValueError, match="Sequential does not say which layer is its classifier"):
        make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0)


def test_step_lr_linear_warmup_then_paper_steps() -> None:
    """The cpu budget's ramp: 1/100 of the lr at iteration 0, full lr from `warmup` on, and the
    milestones unchanged."""
    kw = dict(base=0.1, milestones=[500, 750], warmup=100)
    assert step_lr(0, **kw) == pytest.approx(0.001)
    assert step_lr(49, **kw) == pytest.approx(0.05)
    assert step_lr(99, **kw) == pytest.approx(0.1)
    assert step_lr(100, **kw) == pytest.approx(0.1)
    assert step_lr(500, **kw) == pytest.approx(0.01)
    assert step_lr(750, **kw) == pytest.approx(0.001)
    # with the ResNet-110 rule on top: 0.01 until the error rule fires, then the ramp resumes
    rule = dict(PAPER, milestones=[500, 750], warmup_iters=100, warmup_lr=0.01)
    assert lr_at(30, **rule, warmup_ended_at=None) == 0.01
    assert lr_at(60, **rule, warmup_ended_at=40) == pytest.approx(0.061)
