"""Shared by the on-card tests: the `gpu` marks and a short ResNet-20 run config."""

from __future__ import annotations

import pytest
import torch

from reslab.engine.config import TrainConfig

needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_cfg(root, out, **kw) -> TrainConfig:
    """A short ResNet-20 run on the card: section 4.2's batch 128 on the first 2,560 training
    images (20 steps an epoch), test error on 1,000 images."""
    base = dict(
        model="resnet20", data=str(root), out=str(out), device="cuda", precision="bf16",
        val_split=False, train_subset=2560, eval_subset=1000, eval_splits=["test"],
        batch_size=128, iters=30, eval_every=30, save_every=30, log_every=30, seed=0,
        milestones=[20],
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})
