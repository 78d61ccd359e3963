"""torch.distributed set-up from torchrun's environment: NCCL on GPUs, gloo on CPUs.

One process per device. `torchrun` (or `reslab train --nproc N`) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT; a process started without them runs alone (world size 1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from reslab.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    forced: bool = False  # RESLAB_FORCE_DDP=1: process group and DDP even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.forced


# What --device / TrainConfig.device accept (checked by both, before any work).
DEVICE_SPEC = r"auto|cpu|cuda(:\d+)?|mps"


def auto_device(spec: str) -> str:
    """auto -> cuda if torch sees a GPU, else cpu; any other spec unchanged."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec


def resolve_device(spec: str, *, local_rank: int = 0) -> torch.device:
    """reslab's one device rule. auto -> cuda:LOCAL_RANK if a GPU is there, else cpu;
    cuda -> cuda:LOCAL_RANK."""
    spec = auto_device(spec)
    if spec != "auto" and not re.fullmatch(DEVICE_SPEC, spec):
        raise UserError(f"--device {spec}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if spec.startswith("cuda:") and not int(spec[5:]) < torch.cuda.device_count():
        raise UserError(f"--device {spec}: torch sees {torch.cuda.device_count()} CUDA "
                        "device(s) here; use --device cuda or a smaller index")  # fmt: skip
    if spec == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but torch sees no Apple GPU (MPS)")
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but torch sees no CUDA device")
        spec = f"cuda:{local_rank % torch.cuda.device_count()}"
    elif spec.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # Several processes of this machine on one named GPU would all share it (NCCL refuses).
        raise UserError(
            f"--device {spec} names one GPU, but torchrun started "
            f"{os.environ['LOCAL_WORLD_SIZE']} processes on this machine; use --device cuda "
            "(each process takes cuda:LOCAL_RANK) and pick GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device(spec)


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone.

    RESLAB_FORCE_DDP=1 under `torchrun --nproc-per-node 1` joins a one-process group and wraps
    the model in DDP anyway: benchmarks use it to measure what the wrapper costs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    forced = os.environ.get("RESLAB_FORCE_DDP") == "1" and "RANK" in os.environ
    if world <= 1 and not forced:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The store torchrun describes (MASTER_ADDR/PORT). Its agent keeps one store across
        # restarts (--max-restarts): without a prefix per attempt, a restarted process could
        # read the addresses that the killed processes published there and never connect.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"reslab/attempt{restart_count()}", store)
        # device_id binds this rank's NCCL communicator to its GPU now (without it NCCL guesses
        # the device at the first collective, and barrier() warns that it may pick a wrong one).
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)  # fmt: skip
    return DistInfo(rank=rank, world_size=world, local_rank=local, forced=forced)


def restart_count() -> int:
    """How many times torchrun restarted the worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def elastic_run_id() -> str | None:
    """torchrun's rendezvous id (a fresh uuid per `--standalone` launch; --rdzv-id otherwise)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (and return it); a no-op when running alone."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank: ranks must take the same branch
    around collectives, or the ones that went the other way wait forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(model: nn.Module, *, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BN running statistics) to every rank.

    With BN per device each rank's running statistics have seen only its own share of the last
    batch; evaluating with rank 0's on every rank makes a distributed evaluation score exactly
    the model that rank 0 writes to the checkpoint.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for b in model.buffers():
        dist.broadcast(b, src=src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllGather(torch.autograd.Function):
    """[world, *x.shape]: every rank's x. The total loss is the sum of the ranks' losses, so
    the gradient of this rank's x is its row of the all-reduced (summed) output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[dist.get_rank()]


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are taken over all ranks, for CPU (gloo) processes.

    torch's nn.SyncBatchNorm refuses CPU tensors. Here each rank computes its per-channel
    count, mean and sum of squared deviations (two-pass, so no cancellation), a differentiable
    all-gather shares them, and the global mean and variance follow from the parallel-variance
    formula; the backward all-reduces the statistics' gradients, so the gradients equal those of
    one process normalising the whole global batch. Same parameters and buffers as
    BatchNorm2d: checkpoints do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        # Statistics in fp32 (or fp64) also for bf16/fp16 activations.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        c = xf.shape[1]
        n_r = torch.full((1,), xf.numel() / c, device=x.device, dtype=xf.dtype)
        mean_r = xf.mean((0, 2, 3))
        m2_r = (xf - mean_r[None, :, None, None]).square().sum((0, 2, 3))
        g = _AllGather.apply(torch.cat([n_r, mean_r, m2_r]))  # [world, 1 + 2C]
        counts, means, m2s = g[:, :1], g[:, 1 : 1 + c], g[:, 1 + c :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / n  # biased, as BN uses
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        y = (xf - mean[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> nn.SyncBatchNorm on GPUs, GlooSyncBatchNorm (2d only) on CPUs.

    The converted layers keep the same Parameter objects and buffers, but call this before
    building the optimizer anyway, so that nothing can refer to a replaced module.
    """
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, device=device,
        )  # fmt: skip
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, nn.BatchNorm2d
    ):
        raise ValueError(f"--sync-bn on CPU supports BatchNorm2d only, found {type(module)}")
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
