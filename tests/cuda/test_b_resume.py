"""Stop at 100 iterations and resume to 200 on the card (the checkpoint loaded onto the GPU, RNG
states included): the same metrics and weights as one uninterrupted run; eager fp32 with
deterministic algorithms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cuda_helpers import cuda_cfg, needs_cuda

from reslab.engine.trainer import train
from reslab.runtime.checkpoint import load_checkpoint

pytestmark = needs_cuda


@pytest.fixture
def deterministic():
    # warn_only: adaptive_avg_pool2d's CUDA backward is flagged (it uses atomicAdd), but with a
    # 1x1 output each input gradient receives one addition, so its result is exact anyway.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_time", "images_per_s")} for r in rows]


def test_stopped_at_100_and_resumed_to_200_equals_uninterrupted(
    cifar_root: Path, tmp_path: Path, deterministic: None
) -> None:
    kw = dict(precision="fp32", iters=200, eval_every=100, save_every=100, log_every=50,
              milestones=[150])  # fmt: skip
    train(cuda_cfg(cifar_root, tmp_path / "whole", **kw), progress=False)
    assert not torch.backends.cudnn.benchmark  # autotuning stays off under determinism
    train(cuda_cfg(cifar_root, tmp_path / "split", **{**kw, "iters": 100}), progress=False)
    train(cuda_cfg(cifar_root, tmp_path / "split", **kw), resume=True, progress=False)
    assert _rows(tmp_path / "split") == _rows(tmp_path / "whole")
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 200
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["rng"]["cuda"][0], b["rng"]["cuda"][0])
