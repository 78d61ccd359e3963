"""Run an experiment's training runs (skipping finished ones, resuming interrupted ones) and
write its REPORT.md.

An experiment module (table6.py, fig6.py, ...) provides
  TITLE: str
  plan(ctx: Context) -> Plan       the runs, with notes on how this budget differs from the paper
  analyse(ctx, results) -> Facts   what the runs show (a dataclass: numbers, claims' answers)
  plot(ctx, results, facts)        writes its PNGs into ctx.out
  render(facts) -> str             markdown body of the report, from the facts alone
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reslab.analysis.records import read_metrics
from reslab.data import resolve_data_root
from reslab.engine.config import TrainConfig
from reslab.runtime.yaml_file import read_yaml

# cpu-long: the depth comparisons only (table6, fig6, fig7); cpu-xl: table6 only. Each
# module's BUDGETS says which it has.
BUDGETS = ("smoke", "cpu", "cpu-long", "cpu-xl", "full")
EXPERIMENTS = {
    "table6": "reslab.experiments.table6",
    "fig6": "reslab.experiments.fig6",
    "fig7": "reslab.experiments.fig7",
    "shortcuts": "reslab.experiments.shortcuts",
    "relu-tanh": "reslab.experiments.relu_tanh",
    "alexnet-parts": "reslab.experiments.alexnet_parts",
}
# Fields that change how a run executes but not what it computes: a finished run made with
# other values of these is still the same run.
_EXECUTION_FIELDS = {
    "out",
    "data",
    "device",
    "precision",
    "time_limit",
    "compile",
    "compile_mode",
    "workers",
    "download",
    "log_every",
    "save_every",
}


@dataclass
class RunSpec:
    name: str  # RUN_DIR name under the runs root, e.g. "resnet20-s0"
    label: str  # legend / table label, e.g. "ResNet-20"
    cfg: TrainConfig
    tags: dict[str, Any] = field(default_factory=dict)  # e.g. {"depth": 20, "seed": 0}


@dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    final: dict[str, Any]  # final.json: the last evaluation row
    rows: list[dict[str, Any]]  # metrics.jsonl
    status: str  # "trained" | "resumed" | "skipped" (finished before) | "diverged" (NaN loss)
    seconds: float  # wall time of this call for this run (0 when skipped)


@dataclass
class Plan:
    specs: list[RunSpec]
    notes: list[str] = field(default_factory=list)  # how this budget differs from the paper
    fused: bool = False  # train a configuration's seeds as one fused net (fused_runs.py)


@dataclass
class Context:
    name: str
    budget: str
    out: Path  # REPORT.md and figures
    runs_root: Path  # RUN_DIRs live in runs_root / spec.name
    seeds: int
    data: str
    device: str
    command: str  # the command line that makes this report
    progress: bool = True


def _read_final(path: Path) -> dict[str, Any]:
    """A run's final.json, with a whole-number `iter`: damage is one ValueError naming it."""
    try:
        final = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        final = None
    if not isinstance(final, dict) or not isinstance(final.get("iter", 0), int):
        raise ValueError(f"{path} is damaged (not a run's final.json); delete it and the "
                         "next call resumes (or restarts) that run")  # fmt: skip
    return {**final, "iter": int(final.get("iter", 0))}


class ConfigMismatch(RuntimeError):
    """A RUN_DIR holds a run made with a different configuration."""


class RunProcessDied(RuntimeError):
    """A --jobs worker process ended without a result (killed: out of memory, a signal)."""


def _same_run(old: dict[str, Any], cfg: TrainConfig, run_dir: Path) -> None:
    new = cfg.to_dict()
    diff = sorted(k for k in new if k not in _EXECUTION_FIELDS and k in old and old[k] != new[k])
    if diff:
        detail = ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} now" for k in diff[:4])
        raise ConfigMismatch(
            f"{run_dir} holds a run with another configuration ({detail}); pass a different "
            "--out (or --runs), or delete that directory to train it again"
        )


def check_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """ConfigMismatch unless what run_dir holds (if anything) is a run of `cfg`: by its
    config.yaml, or, without one, by the configuration stored in a finished run's last.pt (a
    copied run of another net would be reported under this spec's name)."""
    from reslab.runtime.yaml_file import YamlFileError

    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            old = read_yaml(cfg_file) or {}
        except YamlFileError as e:
            raise ConfigMismatch(f"{e}; delete {run_dir} to train that run again, or pass "
                                 "another --runs") from None  # fmt: skip
        _same_run(old if isinstance(old, dict) else {}, cfg, run_dir)
    elif (run_dir / "final.json").is_file() and (run_dir / "last.pt").is_file():
        from reslab.runtime.checkpoint import load_checkpoint

        _same_run(load_checkpoint(run_dir / "last.pt").get("config") or {}, cfg, run_dir)


def fresh_compiler(cfg: TrainConfig) -> None:
    """Empty torch.compile's caches before a compiled run. Dynamo keeps compiled code per Python
    function for the life of the process, at most `recompile_limit` (8) variants of each: the
    9th distinct net one process compiles would silently run eager (reproduce's sequential
    runs and its --jobs pool workers each train many nets in one process)."""
    if cfg.compile:
        import torch._dynamo

        torch._dynamo.reset()


def run_one(
    spec: RunSpec, *, runs_root: Path, progress: bool = True, label: bool = False
) -> RunResult:
    """Train one run in runs_root/spec.name; skip it if finished, resume it if interrupted.
    label: put the run's name before each line it prints (runs trained side by side)."""
    from reslab.engine.trainer import TrainingDiverged, train

    run_dir = runs_root / spec.name
    cfg = spec.cfg
    cfg.out = str(run_dir)
    final_file = run_dir / "final.json"
    check_run_dir(run_dir, cfg)
    if final_file.is_file():
        final = _read_final(final_file)
        if final["iter"] >= cfg.iters:
            rows = read_metrics(run_dir, missing_ok=True)
            return RunResult(spec, run_dir, final, rows, "skipped", 0.0)
    resume = (run_dir / "last.pt").is_file()
    fresh_compiler(cfg)
    t0 = time.perf_counter()
    try:
        final = train(cfg, resume=resume, progress=progress, label=spec.name if label else None)
    except TrainingDiverged as e:
        # One diverged net must not cost the other runs of a long unattended experiment: the
        # report lists it as diverged (with its rows up to then), and a rerun tries it again.
        print(f"{spec.name}: {e}", flush=True)
        return RunResult(spec, run_dir, {}, read_metrics(run_dir, missing_ok=True), "diverged",
                         time.perf_counter() - t0)  # fmt: skip
    return RunResult(
        spec,
        run_dir,
        final,
        read_metrics(run_dir, missing_ok=True),
        "resumed" if resume else "trained",
        time.perf_counter() - t0,
    )


def default_data() -> str:
    return resolve_data_root(None)


_WORKER_SLOT = 0  # this pool worker's number, 0 .. jobs-1 (set by _init_worker)


def _init_worker(counter: Any, compile_threads: int | None = None) -> None:
    global _WORKER_SLOT
    if compile_threads:
        # Before torch._inductor is imported here: one compile pool per job, sized to share the
        # cores (each would otherwise start one thread per core).
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(compile_threads))
    with counter.get_lock():
        _WORKER_SLOT = counter.value
        counter.value += 1


def worker_device(device: str, slot: int) -> str:
    """The device of pool worker `slot`: "auto"/"cuda" spread the workers over the visible GPUs
    (cuda:slot mod count) instead of all taking cuda:0; a named device or the CPU is kept."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{slot % torch.cuda.device_count()}"
    return device


def _run_quiet(spec: RunSpec, runs_root: Path, threads: int) -> RunResult:
    """run_one in a worker process (no progress bar: several would interleave)."""
    import torch

    torch.set_num_threads(threads)
    spec.cfg.device = worker_device(spec.cfg.device, _WORKER_SLOT)
    return run_one(spec, runs_root=runs_root, progress=False, label=True)


def run_all(
    specs: list[RunSpec], *, runs_root: Path, jobs: int = 1, progress: bool = True, tag: str = ""
) -> list[RunResult]:
    """Every spec's run, in order. jobs > 1 trains that many runs at once in spawned processes:
    small CIFAR nets do not fill a GPU, so several share it (the issue's speed target)."""
    if jobs <= 1:
        results = []
        for i, spec in enumerate(specs, 1):
            if progress:
                print(f"[{tag}] run {i}/{len(specs)}: {spec.name}", flush=True)
            # Quiet: no "run i/N" header, so each printed row names its run instead.
            results.append(run_one(spec, runs_root=runs_root, progress=progress,
                                   label=not progress))  # fmt: skip
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if progress:
        print(f"[{tag}] {len(specs)} runs, {jobs} at a time", flush=True)
    import torch

    threads = max(1, torch.get_num_threads() // jobs)  # the CPU's threads split between jobs
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    # Longest runs first: the pool hands out runs in submission order, and a long run started
    # last keeps one worker busy while the others idle (fig6 cpu-long on 2 CPU jobs, from the
    # measured run times: 72 min this way, 90 min in plan order).
    order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i].cfg))
    # A worker killed mid-run (out of memory) leaves its semaphores to multiprocessing's resource
    # tracker, which would print a warning about them after RunProcessDied's line below; it
    # starts with the first one (next line) and takes its warning filters from sys.warnoptions.
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    slots = spawn.Value("i", 0)  # numbers the workers as they start, for worker_device
    compiling = any(s.cfg.compile for s in specs)
    compile_threads = max(1, (os.cpu_count() or 1) // jobs) if compiling else None
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn, initializer=_init_worker,
                             initargs=(slots, compile_threads)) as pool:  # fmt: skip
        futures = {i: pool.submit(_run_quiet, specs[i], runs_root, threads) for i in order}
        try:
            return [futures[i].result() for i in range(len(specs))]
        except BrokenProcessPool:
            # The pool stops every run when one worker dies; each run's files stay as its last
            # checkpoint left them, so the same command goes on from there.
            lost = [specs[i].name for i in order
                    if not futures[i].done() or futures[i].exception() is not None]  # fmt: skip
            raise RunProcessDied(
                f"a worker process of --jobs {jobs} ended abruptly (killed, e.g. out of memory), "
                f"which stops the pool; not finished: {', '.join(lost)}. Finished runs and "
                "checkpoints are kept: the same command goes on from them (--jobs 1 runs one "
                "at a time, with less memory)"
            ) from None


def _cost(cfg: TrainConfig) -> float:
    """Multiply-adds of a run's training images (one forward pass counted), to order runs."""
    from reslab.analysis.complexity import count_macs
    from reslab.models import create_model

    size = 32 if cfg.dataset.startswith("cifar") else cfg.image_size
    return float(count_macs(create_model(cfg.model, **cfg.model_options), size)) * (
        cfg.iters * cfg.batch_size
    )


def _budgets(name: str) -> tuple[str, ...]:
    return importlib.import_module(EXPERIMENTS[name]).BUDGETS


def make_plan(
    name: str,
    *,
    budget: str,
    out: str | Path,
    seeds: int = 1,
    data: str | None = None,
    device: str = "auto",
    runs: str | Path | None = None,
    jobs: int = 1,
    compile: bool | str = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
    time_limit: float | None = None,
    fused: bool | None = None,
    threads: int | None = None,
) -> tuple[Context, Any, Plan]:
    """The experiment's context, module and runs, with data/device/compile filled in.

    compile: True for torch.compile's default mode, or a mode name ("reduce-overhead").
    only: run names to keep (the rest of the plan is left out of training and report).
    time_limit: seconds of training per run (this call); a run stopped by it resumes next call.
    fused: train each configuration's seeds as one fused net (None: the device's measured
    default, fused_runs.FUSED_SPEEDUP).
    threads: torch's CPU threads for this process (None: torch's default), split among jobs."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if seeds < 1 or jobs < 1:
        raise ValueError(f"--seeds and --jobs must be at least 1, got {seeds} and {jobs}")
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"--time-limit must be a number of seconds > 0, got {time_limit}")
    for flag, path in (("--runs", runs), ("--out", out)):
        if path is None:
            continue
        # The path itself or a folder it would be made in (`--runs afile/sub`).
        above = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ValueError(f"{flag} {path}: {above} is a file; give a folder for the runs")
    out = Path(out)
    runs_root = Path(runs) / budget if runs else out / "runs" / budget
    argv = reproduce_argv(name, dict(budget=budget, out=str(out), seeds=seeds, runs=runs,
                                     device=device, jobs=jobs, compile=compile, only=only,
                                     time_limit=time_limit, fused=fused,
                                     threads=threads))  # fmt: skip
    if budget not in _budgets(name):
        raise ValueError(
            f"{name} has no {budget!r} budget (it has {', '.join(_budgets(name))}); "
            f"`{budget}` is for {', '.join(n for n in EXPERIMENTS if budget in _budgets(n))}"
        )
    if threads:
        import torch

        torch.set_num_threads(threads)  # on a CPU shared with other jobs: avoid oversubscription
    data = data or default_data()
    ctx = Context(name, budget, out, runs_root, seeds, data, device, shlex.join(argv), progress)
    module = importlib.import_module(EXPERIMENTS[name])
    plan = module.plan(ctx)
    if only:
        names = [s.name for s in plan.specs]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(
                f"--only names {', '.join(unknown)}, not a run of {name} at {budget}; "
                f"its runs are {', '.join(names)}"
            )
        plan.specs = [s for s in plan.specs if s.name in only]
        plan.notes.append(f"only these runs of the plan: {', '.join(s.name for s in plan.specs)}.")
    mode = compile if isinstance(compile, str) else "default"
    for spec in plan.specs:
        spec.cfg = replace(spec.cfg, data=ctx.data, device=ctx.device, compile=bool(compile),
                           compile_mode=mode, time_limit=time_limit,
                           out=str(runs_root / spec.name))  # fmt: skip
    if seeds > 1:
        from reslab.experiments.fused_runs import fused_default

        default, why = fused_default(device, seeds)
        plan.fused = default if fused is None else fused
        how = "as one fused net per configuration" if plan.fused else "one after another"
        src = "this device's default" if fused is None else "--fused"
        plan.notes.append(f"seeds trained {how} ({src}; fused on this device: {why}).")
    return ctx, module, plan


# make_plan's options that `reslab reproduce` flags carry, with their defaults (left out of argv)
_REPRODUCE_DEFAULTS = dict(budget=..., out=..., seeds=1, runs=None, device="auto", jobs=1,
                           compile=False, only=None, time_limit=None, fused=None,
                           threads=None)  # fmt: skip


def reproduce_argv(name: str, opts: dict[str, Any]) -> list[str]:
    """The `reslab reproduce` command line of make_plan's options (cli.reproduce_options reads
    it back): each option that differs from its default. --data is this machine's and stays
    out, so the command works on another machine with its own $RESLAB_DATA."""
    argv = ["reslab", "reproduce", name]
    for key, default in _REPRODUCE_DEFAULTS.items():
        value = opts.get(key, default)
        if value is None or value == default:
            continue
        if key == "compile":
            argv += ["--compile-mode", value] if isinstance(value, str) else ["--compile"]
        elif key == "fused":
            argv += ["--fused", "on" if value else "off"]
        else:
            text = {"only": ",".join, "time_limit": "{:g}".format}.get(key, str)(value)
            argv += ["--" + key.replace("_", "-"), text]
    return argv


def _resume_state(last: Path) -> str:
    """--dry-run's word for a run that has a last.pt and no final.json: the iteration it would
    resume from, or why its checkpoint cannot be used (the run itself would stop there)."""
    from reslab.runtime.checkpoint import load_checkpoint

    try:
        return f"resume (from iteration {int(load_checkpoint(last)['step'])})"
    except Exception as e:  # CheckpointError, UserError, a checkpoint without its step
        return f"REFUSED: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def describe_plan(ctx: Context, plan: Plan) -> str:
    """What a call would do, run by run, without training anything."""
    lines = [f"{ctx.command}", *(f"  {n}" for n in plan.notes)]
    for spec in plan.specs:
        d = Path(spec.cfg.out)
        state = "new"
        if (d / "final.json").is_file():
            it = _read_final(d / "final.json")["iter"]
            state = "finished" if it >= spec.cfg.iters else f"resume (stopped at {it})"
        elif (d / "last.pt").is_file():  # killed before it finished: resumes where it saved
            state = _resume_state(d / "last.pt")
        if (d / "config.yaml").is_file():
            try:
                _same_run(read_yaml(d / "config.yaml") or {}, spec.cfg, d)
            except ConfigMismatch:
                state = "REFUSED: made with another config"
        opts = ", ".join(f"{k}={v}" for k, v in spec.cfg.model_options.items())
        lines.append(f"{spec.name:<28} {spec.cfg.model:<14} {opts:<40} "
                     f"{spec.cfg.iters:>6} its  {state}")  # fmt: skip
    return "\n".join(lines)


def reproduce(
    name: str,
    *,
    budget: str,
    out: str | Path,
    seeds: int = 1,
    data: str | None = None,
    device: str = "auto",
    runs: str | Path | None = None,
    jobs: int = 1,
    compile: bool | str = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
    time_limit: float | None = None,
    fused: bool | None = None,
    threads: int | None = None,
) -> Path:
    """Run experiment `name` at `budget` (smoke | cpu | full) and write OUT/REPORT.md, its path.

    Runs live in RUNS/BUDGET/NAME (RUNS defaults to OUT/runs); finished ones are reused,
    interrupted ones resumed. jobs > 1 trains that many at once in separate processes."""
    from reslab.experiments import report

    ctx, module, plan = make_plan(
        name, budget=budget, out=out, seeds=seeds, data=data, device=device, runs=runs,
        jobs=jobs, compile=compile, progress=progress, only=only, time_limit=time_limit,
        fused=fused, threads=threads,
    )  # fmt: skip
    from reslab.data.cifar import DIRS, check_cifar_files

    # A missing CIFAR is named before OUT or any run directory is made (nothing is left behind).
    for dataset in sorted({s.cfg.dataset for s in plan.specs} & set(DIRS)):
        check_cifar_files(ctx.data, dataset)
    # Every run directory already there, before any run trains: a damaged or foreign one had
    # been found only at its turn, after the runs before it had trained.
    for spec in plan.specs if not plan.fused else ():  # (fused runs keep their own layout)
        check_run_dir(ctx.runs_root / spec.name, spec.cfg)
    ctx.out.mkdir(parents=True, exist_ok=True)
    # What a kill while the last report was written left (.REPORT.md.XXXX.tmp, a figure's, a
    # record's): partial copies of files this call writes again.
    from reslab.engine.rundir import clean_stale_temps

    for folder in (ctx.out, *sorted((ctx.out / "records").glob("*"))):
        if folder.is_dir():
            clean_stale_temps(folder)
    t0 = time.perf_counter()
    if plan.fused:
        from reslab.experiments.fused_runs import run_all_fused

        results = run_all_fused(plan.specs, runs_root=ctx.runs_root, progress=progress,
                                tag=f"{name} {budget}")  # fmt: skip
    else:
        results = run_all(plan.specs, runs_root=ctx.runs_root, jobs=jobs, progress=progress,
                          tag=f"{name} {budget}")  # fmt: skip
    facts = module.analyse(ctx, results)
    module.plot(ctx, results, facts)
    body = module.render(facts)
    return report.write_report(ctx, module.TITLE, plan, results, body,
                               seconds=time.perf_counter() - t0)  # fmt: skip
