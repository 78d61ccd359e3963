"""The main job: a few minutes of real ResNet-20 training on CIFAR-10, then its curves."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from reslab.data import check_data_root, resolve_data_root
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
    if device.type == "cpu" and not cfg.compile:
        # The step the trainer will run: reslab's CPU kernels where they apply. Measured
        # without them, the plan assumed the eager step (half the speed on Intel AMX) and the
        # demo trained about half the minutes asked for.
        from reslab.models.cpu_paths import use_cpu_training_paths

        use_cpu_training_paths(
            model, precision=precision, fused_bn_act=cfg.fused_bn_act,
            tiled_wgrad=cfg.tiled_wgrad,
            announce=lambda line: print(f"reslab: {line}", file=sys.stderr, flush=True),
        )  # fmt: skip
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


def plan_every(iters: int) -> int:
    """Iterations between the demo's evaluations: four of them, the fourth at the last
    iteration (iters // 4 put a fourth at up to 3 iterations before the end, then the final
    evaluation again right after it: a second pass over the test set and a row whose training
    error was measured on 1-3 batches)."""
    return max(10, -(-iters // 4))


# What the demo plans from the measured speed; everything else is the cifar10-fast recipe.
_PLANNED = ("iters", "eval_every", "save_every", "warmup_iters", "time_limit")


def run_demo(*, data: str | None, out: str, minutes: float, download: bool = False) -> dict:
    check_data_root(data, folders=False)
    cfg = replace(load_recipe("cifar10-fast"), data=resolve_data_root(data), out=out,
                  download=download)  # fmt: skip
    # A missing CIFAR is named (or fetched) before seconds of speed measurement.
    if download:
        from reslab.data.cifar import download_cifar

        download_cifar(cfg.data, dataset=cfg.dataset)
    else:
        from reslab.data.cifar import check_cifar_files

        check_cifar_files(cfg.data, cfg.dataset)
    earlier = _earlier_demo(cfg)
    if earlier is not None:
        # An interrupted demo resumes on its own plan: planned again from today's speed it
        # would differ (iterations, warm-up) and resuming would refuse it.
        cfg = replace(cfg, **{k: earlier[k] for k in _PLANNED})
        if cfg.time_limit:  # planned as 1.5x the minutes asked for
            minutes = cfg.time_limit / 90
        if _finished(cfg) is None:
            print(f"reslab demo: resuming the demo in {out} ({cfg.iters} iterations planned "
                  f"for {minutes:g} min)")  # fmt: skip
    else:
        per_step = seconds_per_step(cfg)
        # Plan the schedule to end on time: the cosine schedule needs to know its length. 10%
        # of the time is left for the evaluations; time_limit is a hard stop if the machine is
        # slower than measured.
        iters = max(20, int(0.9 * minutes * 60 / per_step))
        every = plan_every(iters)
        cfg = replace(cfg, iters=iters, eval_every=every, save_every=every,
                      warmup_iters=min(cfg.warmup_iters, iters // 10),
                      time_limit=minutes * 60 * 1.5)  # fmt: skip
        print(
            f"reslab demo: ResNet-20 on CIFAR-10 ({cfg.data}), recipe cifar10-fast (not the "
            f"paper's), {cfg.iters} iterations of batch {cfg.batch_size} planned from a measured "
            f"{cfg.batch_size / per_step:.0f} img/s, about {minutes:g} minutes"
        )
    from reslab.engine.trainer import train

    resume = earlier is not None
    final = _finished(cfg) if resume else None
    if final is not None:  # run again on a finished demo: its result, not another evaluation
        print(f"reslab demo: the demo in {out} is finished; give a new --out to train another")
    else:
        final = train(cfg, resume=resume,
                      recipe=f"cifar10-fast planned for {minutes:g} min (demo)")  # fmt: skip
    from reslab.analysis.plots import load_runs, plot_curves

    png = plot_curves(load_runs([out]), out=Path(out) / "curves.png", title="reslab demo")
    print(
        f"ResNet-20 test error after {final['iter']} iterations "
        f"({final['epoch']:.1f} epochs, {final['wall_time'] / 60:.1f} min): "
        f"{final['test_error']:.2f}% (the paper's, after 64k iterations: 8.75%)\ncurves: {png}"
    )
    return final


def _finished(cfg: TrainConfig) -> dict | None:
    """final.json of a demo that ran all its planned iterations, else None (a damaged file is
    left to train's own checks)."""
    import json

    try:
        final = json.loads((Path(cfg.out) / "final.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(final, dict) and isinstance(final.get("iter"), int)
    keys = ("epoch", "wall_time", "test_error")
    if (
        not ok
        or final["iter"] < cfg.iters
        or not all(isinstance(final.get(k), float) for k in keys)
    ):
        return None
    return final


def _earlier_demo(cfg: TrainConfig) -> dict | None:
    """The stored config of a demo already in cfg.out (to resume), None for a fresh folder; a
    folder holding any other run is refused, naming what differs."""
    from reslab.errors import UserError
    from reslab.runtime.yaml_file import read_yaml

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give the demo a folder")
    if not (out / "last.pt").exists():
        # Nothing saved to resume (a demo stopped before its first checkpoint starts again);
        # train's own checks refuse files that no run of its own wrote.
        return None
    stored_file = out / "config.yaml"
    stored = read_yaml(stored_file, what="run config") if stored_file.is_file() else None
    mine = cfg.to_dict()
    skip = {*_PLANNED, "data", "out", "download", "device", "precision", "workers"}
    diff = (
        sorted(k for k in mine if k not in skip and k in stored and stored[k] != mine[k])
        if isinstance(stored, dict)
        else ["config.yaml"]
    )
    planned = isinstance(stored, dict) and all(
        isinstance(stored.get(k), (int, float)) and not isinstance(stored.get(k), bool)
        for k in ("iters", "eval_every", "save_every", "warmup_iters")
    )
    if diff or not planned:
        raise UserError(
            f"--out {out} holds another run, not a demo (its {', '.join(diff[:3]) or 'plan'} "
            f"differ{'s' if len(diff) == 1 else ''}); give the demo a new --out, or continue "
            f"that run with `reslab train --out {out} --resume`"
        )
    return stored
