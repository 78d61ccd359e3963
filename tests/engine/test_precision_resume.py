"""Resume restores RNG states whatever layout or device torch.load gave them, and fp16 training
goes through a GradScaler whose state is checkpointed and restored."""

from __future__ import annotations

from pathlib import Path

import torch

from reslab.engine.config import TrainConfig
from reslab.engine.trainer import train
from reslab.runtime.checkpoint import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as a non-contiguous view: what the generators refuse as given."""
    big = torch.zeros(2 * t.numel(), dtype=t.dtype)
    view = big[::2]
    view.copy_(t)
    return view


def test_rng_state_restores_from_a_loaded_checkpoint_in_any_layout(tmp_path: Path) -> None:
    torch.manual_seed(123)
    save_atomic(
        {"format": "reslab", "version": CHECKPOINT_VERSION, "rng": rng_state()}, tmp_path / "c.pt"
    )
    expected = torch.rand(6)
    loaded = load_checkpoint(tmp_path / "c.pt")["rng"]
    # map_location=<device> leaves the states on that device; torch.set_rng_state takes only a
    # contiguous CPU uint8 tensor ("RNG state must be contiguous" for this view).
    state = {"torch": _strided(loaded["torch"])}
    torch.rand(100)
    set_rng_state(state)
    assert torch.equal(torch.rand(6), expected)


def _cfg(root: Path, out: Path, iters: int) -> TrainConfig:
    return TrainConfig(
        model="resnet20", data=str(root), out=str(out), device="cpu", precision="fp16",
        val_split=False, train_subset=32, eval_subset=16, eval_splits=["test"], batch_size=8,
        iters=iters, eval_every=iters, save_every=3, log_every=3, seed=0,
    )  # fmt: skip


def test_fp16_trains_through_a_grad_scaler_that_resumes(cifar_root: Path, tmp_path: Path) -> None:
    train(_cfg(cifar_root, tmp_path / "whole", 6), progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    # The scaler updated at every step: each either counted towards growth, or overflowed and
    # halved the scale (restarting the count); 65536 is GradScaler's initial scale.
    sc = whole["scaler"]
    halvings = round(torch.tensor(65536.0 / sc["scale"]).log2().item())
    assert halvings >= 0 and sc["_growth_tracker"] + halvings <= 6
    assert halvings > 0 or sc["_growth_tracker"] == 6
    train(_cfg(cifar_root, tmp_path / "split", 3), progress=False)
    train(_cfg(cifar_root, tmp_path / "split", 6), resume=True, progress=False)
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    assert split["scaler"] == whole["scaler"]  # restored at 3, not restarted
    for k, v in whole["model"].items():
        torch.testing.assert_close(split["model"][k], v, rtol=0, atol=0, msg=k)


def test_fp32_checkpoints_an_empty_scaler(cifar_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(cifar_root, tmp_path / "run", 1)
    cfg.precision = "fp32"
    train(cfg, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["scaler"] == {}


def test_exact_fp32_turns_tf32_off_inside_and_restores_it() -> None:
    from reslab.runtime.precision import exact_fp32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True  # torch's default for cuDNN
        with exact_fp32():
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def test_cudnn_autotuning_on_cuda_unless_determinism_was_asked_for() -> None:
    from reslab.runtime.precision import tune_cuda

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        tune_cuda(torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark  # CPU runs leave cuDNN alone
        tune_cuda(torch.device("cuda", 0))  # sets a flag only: no GPU needed to check it
        assert torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(True)
        tune_cuda(torch.device("cuda", 0))
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = before
