"""Top-1 / top-5 error of a model over a loader, batched and summed on the device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from reslab.engine.distributed import all_reduce_sum
from reslab.engine.precision import autocast


@dataclass
class EvalResult:
    top1_error: float  # %
    top5_error: float  # %
    count: int


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, *, device: torch.device, precision: str = "fp32"
) -> EvalResult:
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top1 right, top5 right, seen
    for x, y in loader:
        with autocast(precision, device):
            logits = model(x)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == y[:, None]
        counts += torch.stack(
            [hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)]
        )
    model.train(was_training)
    c1, c5, n = all_reduce_sum(counts).tolist()
    return EvalResult(100.0 * (1 - c1 / max(n, 1)), 100.0 * (1 - c5 / max(n, 1)), n)
