"""The main job: a few minutes of real ResNet-20 training on CIFAR-10, then its curves."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from reslab.data import resolve_data_root
from reslab.engine.config import TrainConfig, load_recipe
from reslab.models import create_model
from reslab.runtime.distributed import resolve_device
from reslab.runtime.precision import autocast, resolve_precision


def seconds_per_step(cfg: TrainConfig, *, steps: int = 6) -> float:
    """Measured time of one training step of `cfg`'s model and batch on random data."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = create_model(cfg.model, **cfg.model_options).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(precision, device):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[2:])[len(times[2:]) // 2]  # median after warm-up


def run_demo(*, data: str | None, out: str, minutes: float, download: bool = False) -> dict:
    cfg = replace(load_recipe("cifar10-fast"), data=resolve_data_root(data), out=out,
                  download=download)  # fmt: skip
    per_step = seconds_per_step(cfg)
    # Plan the schedule to end on time: the cosine schedule needs to know its length. 10% of
    # the time is left for the evaluations; time_limit is a hard stop if the machine is slower
    # than measured.
    iters = max(20, int(0.9 * minutes * 60 / per_step))
    cfg = replace(cfg, iters=iters, eval_every=max(10, iters // 4),
                  save_every=max(10, iters // 4), warmup_iters=min(cfg.warmup_iters, iters // 10),
                  time_limit=minutes * 60 * 1.5)  # fmt: skip
    print(
        f"reslab demo: ResNet-20 on CIFAR-10 ({cfg.data}), recipe cifar10-fast (not the "
        f"paper's), {cfg.iters} iterations of batch {cfg.batch_size} planned from a measured "
        f"{cfg.batch_size / per_step:.0f} img/s, about {minutes:g} minutes"
    )
    from reslab.engine.trainer import train

    resume = (Path(out) / "last.pt").exists()
    final = train(cfg, resume=resume, recipe=f"cifar10-fast planned for {minutes:g} min (demo)")
    from reslab.analysis.plots import load_runs, plot_curves

    png = plot_curves(load_runs([out]), out=Path(out) / "curves.png", title="reslab demo")
    print(
        f"ResNet-20 test error after {final['iter']} iterations "
        f"({final['epoch']:.1f} epochs, {final['wall_time'] / 60:.1f} min): "
        f"{final['test_error']:.2f}% (the paper's, after 64k iterations: 8.75%)\ncurves: {png}"
    )
    return final
