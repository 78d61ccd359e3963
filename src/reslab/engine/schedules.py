"""Learning-rate schedules as pure functions of the iteration, and the optimizer of section 3.4."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from reslab.models.registry import classifier_name


def step_lr(
    it: int, *, base: float, milestones: Sequence[int], gamma: float = 0.1, warmup: int = 0
) -> float:
    """base * gamma ** (number of milestones passed): lr 0.1, /10 at 32k and 48k (section 4.2);
    with `warmup`, a linear ramp to `base` over the first `warmup` iterations."""
    if it < warmup:
        return base * (it + 1) / warmup
    return base * gamma ** sum(it >= m for m in milestones)


def cosine_lr(it: int, *, base: float, total: int, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up to `base` over `warmup` iterations, then half a cosine down to `final`."""
    if it < warmup:
        return base * (it + 1) / warmup
    t = min(1.0, (it - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def linear_lr(it: int, *, base: float, total: int, warmup: int = 0) -> float:
    """Linear warm-up to `base` over `warmup` iterations, then a straight line down to 0 at
    `total`: under a fixed budget of iterations a linear decay matches or beats cosine and step
    schedules (Li, Yumer & Ramanan, "Budgeted Training", ICLR 2020)."""
    if it < warmup:
        return base * (it + 1) / warmup
    return base * max(0.0, 1.0 - (it - warmup) / max(1, total - warmup))


def lr_at(
    it: int,
    *,
    schedule: str,
    base: float,
    milestones: Sequence[int],
    gamma: float,
    total: int,
    warmup_iters: int = 0,
    warmup_lr: float | None = None,
    warmup_ended_at: int | None = None,
) -> float:
    """The learning rate for iteration `it`.

    warmup_lr (ResNet-110, section 4.2): the run trains at warmup_lr until the training error
    first falls below a threshold — the trainer records that iteration as `warmup_ended_at` —
    and from then on follows the main schedule from its start value (0.1), not a decayed one.
    """
    if warmup_lr is not None and (warmup_ended_at is None or it < warmup_ended_at):
        return warmup_lr
    if schedule == "step":
        return step_lr(it, base=base, milestones=milestones, gamma=gamma, warmup=warmup_iters)
    if schedule == "cosine":
        return cosine_lr(it, base=base, total=total, warmup=warmup_iters)
    if schedule == "linear":
        return linear_lr(it, base=base, total=total, warmup=warmup_iters)
    raise ValueError(f"schedule must be 'step', 'cosine' or 'linear', got {schedule!r}")


def make_sgd(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
    head_lr_mult: float = 1.0, head: str | None = None, decay_bn: bool = True,
) -> torch.optim.SGD:  # fmt: skip
    """SGD with momentum and weight decay (section 3.4). Parameter groups: the classifier `head`
    (default: the model's own, reslab.models.classifier_name) may get its own learning rate
    (fine-tuning); decay_bn=False exempts BN and biases from decay. Each group's `lr_mult`
    scales the scheduled learning rate."""
    if head is None and head_lr_mult != 1.0:
        head = classifier_name(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = head is not None and name.startswith(head + ".")
        no_decay = not decay_bn and p.dim() <= 1
        groups.setdefault((is_head, no_decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr_mult": head_lr_mult if is_head else 1.0,
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (is_head, no_decay), ps in sorted(groups.items())
    ]
    # The fused kernel updates every parameter in one pass instead of one kernel per tensor
    # (benchmarks/bench_train.py compares it with the foreach path).
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
