"""`reslab reproduce --seeds K` with the seeds of one configuration trained as one fused net.

Runs of a plan that differ only in their seed (table6's resnet56-s0..s4, say) train together
through engine/fused_trainer.py; each still gets its own run directory, checkpoints and metrics,
so a finished member is reused, and the report reads them like any other run. Whether fusing
is the default depends on the device type, from measurements (FUSED_SPEEDUP).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from reslab.analysis.records import read_metrics
from reslab.engine.fused_trainer import MEMBER_FIELDS, recover_commit, train_fused
from reslab.engine.trainer import TrainingDiverged
from reslab.experiments.runner import RunResult, RunSpec, _same_run, run_one
from reslab.models import model_info
from reslab.runtime.checkpoint import load_checkpoint
from reslab.runtime.distributed import auto_device
from reslab.runtime.yaml_file import read_yaml

# Measured by benchmarks/bench_fused.py (K fused against K one after another, same iterations,
# training img/s per member): device type -> (largest K fused by default, the measurement).
# Fused is the default only where it was measured faster.
FUSED_MAX_K: dict[str, tuple[int, str]] = {
    # 2-core AMD EPYC, bf16, 1 thread (the setting README advises on a shared CPU): slower,
    # x0.71-0.93 for ResNet-20/56 at K=2 and 5 (load 1.9); oneDNN's grouped 3x3 conv is no
    # faster per member than K separate convs. With 2 threads fused measured x1.16-2.57, but
    # both paths ran 5-8x slower than with 1 thread (OpenMP barriers on busy cores).
    "cpu": (
        0,
        "slower on the CPU measured: x0.71-0.93 for ResNet-20/56 at K=2 and 5, 1 thread "
        "(results/benchmarks/bench_fused_cpu.txt)",
    ),
    # NVIDIA H200, bf16, torch 2.11 (session 9, `scripts/gpu_table6.sh fused`): faster at both
    # K measured; larger K stays one after another until measured.
    "cuda": (
        5,
        "faster on an NVIDIA H200: x1.20-1.36 per member at K=2, x2.74-3.22 at K=5 for "
        "ResNet-20/56/110; 5 seeds take 1.55-1.82x one seed's time (results/gpu/session9/fused.txt)",
    ),
}


def fused_default(device: str, k: int) -> tuple[bool, str]:
    """(fuse k seeds by default on this device, the measurement behind that choice)."""
    # The device type only: a plan for a GPU can be written (--dry-run) on a machine without one.
    kind = torch.device(auto_device(device)).type
    max_k, why = FUSED_MAX_K.get(kind, (0, f"not measured on {kind}"))
    return k <= max_k, why


def _fusable(spec: RunSpec) -> bool:
    cfg = spec.cfg
    return cfg.dataset in ("cifar10", "cifar100") and model_info(cfg.model).family == "cifar"


def group_specs(specs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """The plan's runs in order, runs that differ only in seed (and out) grouped together."""
    groups: dict[str, list[RunSpec]] = {}
    for i, spec in enumerate(specs):
        d = {k: v for k, v in spec.cfg.to_dict().items() if k not in MEMBER_FIELDS}
        key = json.dumps(d, sort_keys=True, default=str) if _fusable(spec) else f"#{i}"
        groups.setdefault(key, []).append(spec)
    return list(groups.values())


def _finished(spec: RunSpec, run_dir: Path) -> dict | None:
    final_file = run_dir / "final.json"
    if final_file.is_file():
        final = json.loads(final_file.read_text())
        if int(final.get("iter", 0)) >= spec.cfg.iters:
            return final
    return None


def run_group(group: list[RunSpec], *, runs_root: Path, progress: bool) -> list[RunResult]:
    """Train a group's unfinished runs fused (their seeds side by side); runs that cannot join
    (finished, or stopped at another iteration than the rest) go through run_one."""
    by_name: dict[str, RunResult] = {}
    pending = []
    for spec in group:
        run_dir = runs_root / spec.name
        spec.cfg.out = str(run_dir)
        if (run_dir / "config.yaml").is_file():
            stored = read_yaml(run_dir / "config.yaml", what="run config") or {}
            _same_run(stored, spec.cfg, run_dir)
        final = _finished(spec, run_dir)
        if final is not None:
            rows = read_metrics(run_dir, missing_ok=True)
            by_name[spec.name] = RunResult(spec, run_dir, final, rows, "skipped", 0)
        else:
            pending.append(spec)
    outs = [Path(s.cfg.out) for s in pending]
    recover_commit(outs)
    steps = {int(load_checkpoint(o / "last.pt")["step"]) if (o / "last.pt").is_file() else 0
             for o in outs}  # fmt: skip
    if len(pending) >= 2 and len(steps) == 1:
        resume = steps != {0}
        t0 = time.perf_counter()
        try:
            # Quiet (no group header printed): each row names its runs.
            label = None if progress else "fused " + ", ".join(s.name for s in pending)
            finals = train_fused([s.cfg for s in pending], resume=resume, progress=progress,
                                 label=label)  # fmt: skip
        except TrainingDiverged as e:
            # One diverged member must not cost the others: each continues alone from its own
            # last.pt (an ordinary checkpoint), and the diverging one is reported as such.
            print(f"fused {', '.join(s.name for s in pending)}: {e}; continuing one by one")
        else:
            secs = (time.perf_counter() - t0) / len(pending)  # the members' shared time
            status = f"{'resumed' if resume else 'trained'} (fused x{len(pending)})"
            for spec, final in zip(pending, finals, strict=True):
                run_dir = Path(spec.cfg.out)
                rows = read_metrics(run_dir, missing_ok=True)
                by_name[spec.name] = RunResult(spec, run_dir, final, rows, status, secs)
            pending = []
    for spec in pending:
        by_name[spec.name] = run_one(spec, runs_root=runs_root, progress=progress,
                                     label=not progress)  # fmt: skip
    return [by_name[s.name] for s in group]


def run_all_fused(
    specs: list[RunSpec], *, runs_root: Path, progress: bool = True, tag: str = ""
) -> list[RunResult]:
    """Every spec's run, in plan order; same-configuration seeds trained fused."""
    results: dict[str, RunResult] = {}
    groups = group_specs(specs)
    for i, group in enumerate(groups, 1):
        if progress:
            names = ", ".join(s.name for s in group)
            print(f"[{tag}] group {i}/{len(groups)}: {names}", flush=True)
        for r in run_group(group, runs_root=runs_root, progress=progress):
            results[r.spec.name] = r
    return [results[s.name] for s in specs]
