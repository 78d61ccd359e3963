"""What a person watching a run sees: the start-up banner, a progress bar refreshed on time, and
a warning when the loss jumps before it turns into NaN."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from reslab.engine.config import TrainConfig


def banner(
    cfg: TrainConfig, *, recipe_note: str, train_size: int, classes: int, evals: dict[str, int],
    device: torch.device, precision: str, world_size: int, notes: list[str],
    kernel: str | None = None, wgrad: str | None = None,
) -> str:  # fmt: skip
    """A few lines that say what is about to run, before the first (slow) iteration; `kernel`
    (bn_act.kernel_status) says how a CPU run computes relu(bn(x) [+ shortcut]), `wgrad`
    (tiled_wgrad.status) how it sums small-map convolutions' weight gradients."""
    epochs = cfg.iters * cfg.batch_size / max(train_size, 1)
    val = ", ".join(f"{k} {n:,}" for k, n in evals.items()) or "none"
    size = cfg.small_size  # progressive resizing, None when off
    small = f"; first {cfg.small_until:.0%} at {size}x{size} (small_size)" if size else ""
    lines = [
        f"reslab train: {cfg.model} on {cfg.dataset} ({cfg.data}), {recipe_note}",
        f"  data       {train_size:,} training images, {classes} classes; evaluated: {val}",
        f"  schedule   {cfg.iters:,} iterations = {epochs:.1f} epochs at batch {cfg.batch_size}, "
        f"lr {cfg.lr:g} ({cfg.schedule}"
        + (f", /10 at {cfg.milestones}" if cfg.schedule == "step" else "")
        + (f", head x{cfg.head_lr_mult:g}" if cfg.head_lr_mult != 1 else "")
        + (f", linear warm-up {cfg.warmup_iters:,} iterations" if cfg.warmup_iters else "")
        + (
            f", lr {cfg.warmup_lr:g} until training error < {cfg.warmup_until_error:g}%"
            if cfg.warmup_lr is not None
            else ""
        )
        + ")"
        + small,
        f"  device     {device}, {precision}, {torch.get_num_threads()} CPU threads"
        + (f", {world_size} processes" if world_size > 1 else "")
        + (", torch.compile" if cfg.compile else ""),
        f"  output     {cfg.out}",
    ]
    if kernel:
        lines.insert(-1, f"  BN+ReLU    {kernel}")
    if wgrad:
        lines.insert(-1, f"  conv wgrad {wgrad}")
    busy = busy_cpu_note(device, torch.get_num_threads())
    emulated = emulated_bf16_note(device, precision)
    lines += [f"  note       {n}" for n in [*notes, *(m for m in (emulated, busy) if m)]]
    return "\n".join(lines)


def emulated_bf16_note(device: torch.device, precision: str) -> str | None:
    """A warning when bf16 was asked for on a CPU that only emulates it (no AVX512-BF16 or AMX,
    e.g. AMD Zen 3): there a ResNet-20 training step at batch 128 took 4.5 s in bf16 against
    0.36 s in fp32 (results/cpu-kind/amd-nobf16-20261203). `--precision auto` picks fp32 there."""
    from reslab.runtime.precision import bf16_is_fast

    if device.type != "cpu" or precision != "bf16" or bf16_is_fast(device):
        return None
    return ("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and trains over "
            "10x slower than fp32 here; --precision auto (or fp32) trains in fp32")  # fmt: skip


def busy_cpu_note(device: torch.device, threads: int, *, window: float = 0.2) -> str | None:
    """A warning when other jobs keep the CPU busy right now: OpenMP threads that wait on each
    other at every op run many times slower than one thread on a free core (README: 5x on two
    busy cores). Measured over `window` seconds before the run computes anything: the CPU time
    of this process's cores (/proc/stat) less this process's own. Linux only; elsewhere None."""
    if device.type != "cpu" or threads < 2:
        return None
    others = _busy_cores_of_others(window)
    if others is None:
        return None
    cores, busy = others
    # Fewer idle cores than threads (more threads than cores is oversubscribed by itself, not
    # by others), with half a core's slack for measurement noise.
    if busy < cores - min(threads, cores) + 0.5:
        return None
    return (f"the CPU is busy before this run starts (other jobs keep {busy:.1f} of its {cores} "
            f"cores busy): {threads} threads will wait on each other; --threads 1 can be "
            "several times faster")  # fmt: skip


def _busy_cores_of_others(window: float) -> tuple[int, float] | None:
    """(cores this process may run on, how many of them other processes kept busy on average
    over `window` seconds), from the per-CPU lines of /proc/stat."""
    import os

    try:
        cpus = sorted(os.sched_getaffinity(0))
        tick = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None

    def sample() -> int | None:
        # cpuN user nice system idle iowait irq softirq steal ...: busy = user + nice + system
        # + irq + softirq; steal (the hypervisor's) is neither ours nor another job's.
        try:
            with open("/proc/stat") as f:
                rows = {ln.split()[0]: ln.split()[1:] for ln in f if ln.startswith("cpu")}
        except OSError:
            return None
        busy = 0
        for c in cpus:
            v = [int(x) for x in rows.get(f"cpu{c}", [])[:7]]
            if len(v) < 7:
                return None
            busy += v[0] + v[1] + v[2] + v[5] + v[6]
        return busy

    first, own0, wall0 = sample(), time.process_time(), time.perf_counter()
    if first is None:
        return None
    time.sleep(window)
    second, own1, wall1 = sample(), time.process_time(), time.perf_counter()
    if second is None:
        return None
    wall = wall1 - wall0
    busy = (second - first) / tick / wall - (own1 - own0) / wall
    return len(cpus), max(0.0, busy)


def preprocess_record(pre: Any) -> dict[str, Any]:
    """The normalisation the run applies, for config.yaml (plain YAML values): per-channel
    mean/std as numbers; a per-pixel mean image is named, not dumped (checkpoints carry it)."""
    d = pre.to_dict()
    if d["mode"] == "per_pixel":
        d["mean"] = f"per-pixel mean image {list(pre.mean.shape)} (stored in the checkpoints)"
    d["std"] = [round(float(v), 6) for v in d["std"]]
    if isinstance(d["mean"], list):
        d["mean"] = [round(float(v), 6) for v in d["mean"]]
    return d


class Clock:
    """True once `every` seconds have passed since the last tick: lets the loop read its loss
    (a host sync) about once a second, however long or short an iteration is."""

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.last = every, time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False


class LossWatch:
    """Warns when an interval's mean loss exceeds `factor` x the running mean of the previous
    intervals: a run that is blowing up, usually some intervals before the loss is NaN."""

    def __init__(self, factor: float = 10.0, warmup: int = 3, decay: float = 0.9) -> None:
        self.factor, self.warmup, self.decay = factor, warmup, decay
        self.mean: float | None = None
        self.count = 0
        self.warned = 0.0  # the loss of the last warning

    def update(self, loss: float, *, step: int, lr: float) -> str | None:
        if not math.isfinite(loss):
            return None  # the NaN check reports that itself
        warn = None
        jumped = self.mean is not None and self.count >= self.warmup
        jumped = jumped and loss > self.factor * max(self.mean, self.warned)
        if jumped:
            # Once warned, again only after a further `factor`x rise: one line per decade.
            self.warned = loss
            warn = (
                f"warning: loss {loss:.3g} at iteration {step} is {loss / self.mean:.0f}x its "
                f"running mean {self.mean:.3g} (lr {lr:g}); the run may diverge. If it does, "
                "lower --lr or add a warm-up (--set warmup_iters=...)."
            )
        self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
        self.count += 1
        return warn
