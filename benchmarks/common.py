"""Shared helpers for the benchmarks: hardware description and the machine's measured peak."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch


def hardware() -> str:
    from reslab.engine.trainer import run_info

    i = run_info()
    gpu = f", GPU {i['gpu']}" if "gpu" in i else ""
    return (
        f"CPU {i['cpu']}, {i['cpu_isa']} ({i['cpu_count']} cores, torch threads {i['threads']})"
        f"{gpu}; "
        f"torch {i['torch']}, torchvision {i.get('torchvision', '?')}, python {i['python']}"
    )


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def peak_dtype(precision: str) -> tuple[torch.dtype, str]:
    """The matmul peak a training step in `precision` is measured against: bf16's for bf16,
    fp32's otherwise (on a CPU without native bf16 the default trains in fp32, and the emulated
    bf16 peak, ~100x lower there, would make every path look near or above 100%)."""
    return (torch.bfloat16, "bf16") if precision == "bf16" else (torch.float32, "fp32")


def matmul_peak(
    dtype: torch.dtype, *, n: int = 2048, seconds: float = 2.0, device: torch.device | None = None
) -> float:
    """Measured FLOP/s of a large square matmul in `dtype` on `device` (default the CPU): the
    machine's practical peak for that dtype, as the benchmarks' denominator. Where one n x n
    product would take more than a tenth of `seconds` (bf16 on a CPU without native bf16, e.g.
    AMD Zen 3, runs ~100x below fp32: 13 s for one 2048^2 product), n is halved until it does
    not (down to 256), so that the measurement keeps to about `seconds`."""
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probe = torch.randn(256, 256, device=device).to(dtype)
    probe @ probe
    sync()
    t0 = time.perf_counter()
    probe @ probe
    sync()
    per_flop = (time.perf_counter() - t0) / (2 * 256**3)  # pessimistic: a small product is slower
    while n > 256 and 2 * n**3 * per_flop > seconds / 10:
        n //= 2
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if device.type == "cuda" else 1):  # keep the GPU's queue full
            a @ b
            reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# Where a training step's time goes, by what the op does. First match wins; names are matched
# lower-case against the profiler's op names (eager aten ops and inductor's fused kernels).
_CATEGORIES = (
    # identity-shape BasicBlocks as one op (models/block_op.py): its forward's record and its
    # C++ autograd node, holding the same kernels as the categories below
    ("BasicBlocks as one op (AMX convs + fused BN+ReLU), backward", ("basicblockop>",)),
    ("BasicBlocks as one op (AMX convs + fused BN+ReLU), forward", ("reslab::basic_block",)),
    ("fused BN+ReLU(+add) kernel backward", ("_bnactbackward",)),
    ("fused BN+ReLU(+add) kernel forward", ("_bnact",)),
    # reslab's 3x3 convolutions (models/conv_wgrad.py, tiled_wgrad.py): the autograd nodes' self
    # time is the AMX kernels' (weight gradients; for stride 1 the output and input gradient
    # too: kernels/conv_fwd.cpp) or the tiling's copies; the rest is aten's, counted below.
    (
        "3x3 convs: AMX kernels / tiling, backward",
        ("amxwgradconvbackward", "_tiledwgradconvbackward", "_convsubsamplepadbackward"),
    ),
    ("3x3 convs: AMX kernels, forward", ("amxwgradconv",)),
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution", "conv2d")),
    ("batch norm backward", ("batch_norm_backward",)),
    ("batch norm forward", ("batch_norm",)),
    ("ReLU backward", ("threshold_backward",)),
    ("ReLU forward", ("relu", "clamp_min")),
    ("residual adds + gradient sums", ("aten::add", "_forkbackward")),
    ("inductor fused element-wise kernels", ("compiledfxgraph", "cpp_fused", "graph_")),
    ("optimizer update", ("sgd", "_foreach")),
    ("classifier, pooling, loss", ("addmm", "mm", "mean", "avg_pool", "cross_entropy", "softmax")),
)


def step_profile(step, steps: int = 5) -> list[tuple[str, float]]:
    """Profile `steps` calls of `step()` (after the caller's warm-up) and return
    [(category, fraction of the steps' CPU time)], largest first. Work inside a
    `torch.profiler.record_function("data")` range counts as "data: augmentation on the device"."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for ev in prof.events():
        if ev.self_cpu_time_total <= 0:
            continue
        cat, parent = None, ev
        while parent is not None:  # inside the data range?
            if parent.name == "data":
                cat = "data: augmentation on the device"
                break
            parent = parent.cpu_parent
        name = ev.name.lower()
        for label, keys in _CATEGORIES if cat is None else ():
            if any(k in name for k in keys):
                cat = label
                break
        cat = cat or "other (copies, casts, allocation, autograd bookkeeping)"
        totals[cat] = totals.get(cat, 0.0) + ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return sorted(((k, v / whole) for k, v in totals.items()), key=lambda kv: -kv[1])


def format_profile(rows: list[tuple[str, float]], title: str) -> str:
    lines = [f"{title}: where one step's CPU time goes (torch.profiler, self time)"]
    lines += [f"  {100 * frac:5.1f}%  {name}" for name, frac in rows]
    return "\n".join(lines)


def conv_ceiling(
    model: torch.nn.Module, *, batch: int, size: int = 32, dtype: torch.dtype = torch.bfloat16
) -> tuple[float, list[str]]:
    """Seconds per training step that the model's convolutions alone need at `batch` (forward,
    gradient of the input except for the first layer, gradient of the weight), timed shape by
    shape in `dtype` channels_last on the CPU: the step time if every other op were free.
    Returns (seconds, one line per distinct shape with each phase's time and GFLOP/s: which
    phase of which shape is slow is where a faster convolution would pay)."""
    from reslab.models import conv_wgrad
    from reslab.models.bn_act import load_kernel
    from reslab.models.tiled_wgrad import tile_factor, tile_images, wgrad_path

    shapes: dict[tuple, int] = {}
    modules: dict[tuple, torch.nn.Conv2d] = {}

    def hook(mod, inp, _out):
        key = (tuple(inp[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding, mod.groups)
        shapes[key] = shapes.get(key, 0) + 1
        modules[key] = mod

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [c.register_forward_hook(hook) for c in convs]
    with torch.no_grad():
        model(torch.zeros(batch, 3, size, size))
    for h in handles:
        h.remove()

    def seconds(op, *op_args, reps: int = 10) -> float:
        for _ in range(3):
            op(*op_args)
        t0 = time.perf_counter()
        for _ in range(reps):
            op(*op_args)
        return (time.perf_counter() - t0) / reps

    def tiled_wgrad(gy, x, w, args, t):  # the tiling copies included
        return torch.ops.aten.convolution_backward(
            tile_images(gy, t), tile_images(x, t), w, None, *args, [False, True, False]
        )

    total, lines = 0.0, []
    for i, (key, count) in enumerate(shapes.items()):
        xs, ws, stride, pad, groups = key
        cl = torch.channels_last
        x = torch.randn(xs).to(dtype).contiguous(memory_format=cl)
        w = torch.randn(ws).to(dtype).contiguous(memory_format=cl)
        args = (stride, pad, (1, 1), False, (0, 0), groups)
        y = torch.ops.aten.convolution(x, w, None, *args)
        gy = torch.randn_like(y)
        conv, back = torch.ops.aten.convolution, torch.ops.aten.convolution_backward
        # As reslab's training computes each phase: the AMX kernels or tiled images where the
        # blocks' tiled_wgrad rule takes the conv (models/tiled_wgrad.py; the kernel path's
        # output and input gradient too where models/conv_wgrad.py takes them), else oneDNN.
        path = wgrad_path(modules[key], x)
        ext = load_kernel() if path == "kernel" else None
        s = stride[0]
        if path == "kernel" and conv_wgrad._fwd_kernel(s, ws[0]):
            phases = {"fwd kernel": seconds(ext.conv3x3_forward, x, w, False, None, None, s)}
        else:
            phases = {"fwd": seconds(conv, x, w, None, *args)}
        with torch.no_grad():  # as in a backward, where the kernels take the input gradient
            dgrad_kernel = path == "kernel" and conv_wgrad._dgrad_kernel(s, gy)
        if i == 0:
            pass  # the input image needs no gradient
        elif dgrad_kernel:
            phases["dgrad kernel"] = seconds(ext.conv3x3_forward, gy, w, True, None, None, s)
        else:
            phases["dgrad"] = seconds(back, gy, x, w, None, *args, [True, False, False])
        if path == "kernel":
            phases["wgrad kernel"] = seconds(ext.conv3x3_wgrad, x, gy, stride[0])
        elif path == "tiled":
            t = tile_factor(modules[key], x)
            phases[f"wgrad tiled t={t}"] = seconds(tiled_wgrad, gy, x, w, args, t)
        else:
            phases["wgrad"] = seconds(back, gy, x, w, None, *args, [False, True, False])
        flops = 2 * y.numel() * ws[1] * ws[2] * ws[3]  # each phase does as many multiply-adds
        dt = sum(phases.values())
        total += dt * count
        detail = ", ".join(
            f"{k} {v * 1e3:.2f} ms {flops / v / 1e9:4.0f}" for k, v in phases.items()
        )
        lines.append(
            f"  {count:2d} x conv {ws[1]}->{ws[0]} {ws[2]}x{ws[3]} stride {stride[0]} on "
            f"{xs[2]}x{xs[3]}: {dt * 1e3:6.2f} ms, {flops * len(phases) / dt / 1e9:5.0f} GFLOP/s "
            f"({detail} GFLOP/s)"
        )
    return total, lines


def cifar_default_step(data: str, model_name: str, batch: int = 128, size: int = 32):
    """reslab's default CPU training step on real CIFAR-10 batches, as `reslab train` runs it
    (TensorLoader with batched augmentation, channels_last, autocast where native, the fused
    BN+ReLU and tiled weight-gradient flags set; `size` < 32 downsamples every batch as
    progressive resizing does): returns (precision, model, step) with step() one SGD step. For
    A/B scripts that swap an implementation between rounds of the same step."""
    import torch.nn.functional as F

    from reslab.data.cifar import load_cifar
    from reslab.data.loaders import TensorLoader
    from reslab.data.setup import cifar_preprocess
    from reslab.engine.schedules import make_sgd
    from reslab.models import create_model
    from reslab.models.cpu_paths import use_cpu_training_paths
    from reslab.runtime.precision import autocast, resolve_precision

    dev = torch.device("cpu")
    precision = resolve_precision("auto", dev)
    train = load_cifar(data, split="train")
    torch.manual_seed(0)
    pre = cifar_preprocess("per_pixel", train.images)
    small = {} if size == 32 else {"small_size": size, "small_iters": 10**9}
    loader = TensorLoader(train.images, train.labels, batch_size=batch, preprocess=pre,
                          train=True, channels_last=True, **small)  # fmt: skip
    batches = (b for _ in range(1000) for b in loader)
    model = create_model(model_name).to(memory_format=torch.channels_last)
    use_cpu_training_paths(model, precision=precision)  # the trainer's own call
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        x, y = next(batches)
        with autocast(precision, dev):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return precision, model, step


def median_seconds(f, reps: int = 30, warmup: int = 3) -> float:
    """The median wall time of `reps` calls of f() after `warmup` untimed ones."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ab_arguments(rounds: int = 10, steps: int = 10) -> argparse.ArgumentParser:
    """--data, --model, --rounds, --steps: what every A/B script of the training step takes."""
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--steps", type=int, default=steps, help="timed steps per round and path")
    return p


def alternating_rounds(
    paths: dict[str, Callable[[], None]], step: Callable[[], None], *, rounds: int, steps: int,
    batch: int = 128,
) -> dict[str, list[float]]:  # fmt: skip
    """img/s of `step` in each round for each path, where paths[k]() switches the step to path k.
    The order alternates (forward, then reversed) from round to round, so that a drift of this
    VM's speed falls on every path alike; 3 untimed steps follow each switch. The caller puts
    the default back afterwards."""
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(rounds):
        for k in list(paths) if i % 2 == 0 else list(paths)[::-1]:
            paths[k]()
            for _ in range(3):
                step()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            rates[k].append(batch * steps / (time.perf_counter() - t0))
    return rates


def kernel_rounds(
    kernels: dict, step: Callable[[], None], *, rounds: int, steps: int, batch: int = 128
) -> dict[str, list[float]]:
    """alternating_rounds over builds of reslab's kernels: path k has the block ops
    (models/block_op.py) call kernels[k]; the default is put back afterwards."""
    from reslab.models import block_op

    def switch(name: str) -> Callable[[], None]:
        def to() -> None:
            block_op.load_kernel = lambda: kernels[name]

        return to

    original = block_op.load_kernel
    try:
        return alternating_rounds({k: switch(k) for k in kernels}, step, rounds=rounds,
                                  steps=steps, batch=batch)  # fmt: skip
    finally:
        block_op.load_kernel = original


def print_rounds(model: str, precision: str, rounds: int, steps: int,
                 rates: dict[str, list[float]], base: str, new: str, batch: int = 128) -> None:  # fmt: skip
    """alternating_rounds' img/s per path and round, and new / base per round with its median."""
    print_ratios(model, precision, rounds, steps, rates, [(base, new)], batch=batch)


def print_ratios(model: str, precision: str, rounds: int, steps: int,
                 rates: dict[str, list[float]], pairs: list[tuple[str, str]],
                 batch: int = 128) -> None:  # fmt: skip
    """alternating_rounds' img/s per path and round, then for each (base, new) of `pairs` new /
    base per round with its median (the A/B scripts' steps: each change over the one before it,
    and the last over the first)."""
    print(f"\n{model} training step, batch {batch}, {precision}, {rounds} alternating rounds "
          f"of {steps} steps each (after 3 untimed)")  # fmt: skip
    width = max(len(k) for k in rates)
    for k, v in rates.items():
        print(f"{k:>{width}}: img/s per round " + " ".join(f"{a:.0f}" for a in v)
              + f"; median {statistics.median(v):.0f}")  # fmt: skip
    for base, new in pairs:
        ratio = [b / a for a, b in zip(rates[base], rates[new])]
        print(f"{new} / {base}, per round: " + " ".join(f"{r:.3f}" for r in ratio)
              + f"; median x{statistics.median(ratio):.3f}")  # fmt: skip


def amx_kernel():
    """reslab's compiled kernels where their AMX convolutions run here; else exit with a line
    saying why (the AMX A/B scripts measure nothing elsewhere)."""
    from reslab.models.bn_act import kernel_status, load_kernel

    ext = load_kernel()
    if ext is None or not ext.conv3x3_wgrad_available():
        raise SystemExit(f"the AMX kernels do not run here (kernel: {kernel_status()})")
    return ext


def kernel_variant(suffix: str, *defines: str):
    """reslab's kernels rebuilt with `defines` ("NAME=VALUE": a switch in kernels/*.cpp) under a
    name of their own (the same OpenMP runtime as the default build), to compare with it."""
    from reslab.models import bn_act

    omp = bn_act._openmp_library()
    name = bn_act._kernel_name(omp) + suffix
    return bn_act._build(name, march="native", openmp=omp, defines=defines)
