"""REPORT.md of an experiment: what ran and how, on what, then the experiment's own results."""

from __future__ import annotations

import datetime
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from reslab.analysis.tables import markdown_table
from reslab.engine.config import TrainConfig
from reslab.experiments.recipes import stopped_at

if TYPE_CHECKING:
    from reslab.experiments.runner import Context, Plan, RunResult


def rel(path: Path, ctx: Context) -> str:
    """A link target relative to the report's directory."""
    return Path(os.path.relpath(path, ctx.out)).as_posix()


def fmt(x: Any, digits: int = 2) -> str:
    return "" if x is None else f"{float(x):.{digits}f}"


def last(res: RunResult, key: str) -> float | None:
    """The latest value of a metric in the run's rows (final.json holds the last row)."""
    if res.final.get(key) is not None:
        return float(res.final[key])
    vals = [r[key] for r in res.rows if r.get(key) is not None]
    return float(vals[-1]) if vals else None


def mean_images_per_s(res: RunResult) -> float | None:
    vals = [r["images_per_s"] for r in res.rows if r.get("images_per_s")]
    return sum(vals) / len(vals) if vals else None


def trained_on(run_dir: Path) -> str:
    """Device, GPU or CPU name and precision, as the run's config.yaml recorded them."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return ""
    from reslab.runtime.yaml_file import read_yaml

    doc = read_yaml(path, what="run config")
    info = doc.get("_run") if isinstance(doc, dict) else None
    if not isinstance(info, dict):
        return ""
    chip = info.get("gpu") if str(info.get("device", "")).startswith("cuda") else info.get("cpu")
    return " ".join(str(x) for x in (chip, info.get("precision")) if x)


def _stopped_early(r: RunResult) -> str:
    it = stopped_at(r)
    if it is None:
        return ""
    return f"; STOPPED at {it:,} of {r.spec.cfg.iters:,} iterations (time limit)"


RECORDS = ("config.yaml", "metrics.jsonl", "final.json")  # small enough to commit; no checkpoints


def copy_records(run_dir: Path, dest: Path) -> bool:
    """Copy a run's small records beside the report (each file written to a temporary name and
    renamed), so that its links point at files that travel with the report. True if the run's
    config.yaml was there to copy."""
    from reslab.runtime.checkpoint import copy_atomic

    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        src = run_dir / name
        if src.is_file():
            copy_atomic(src, dest / name)  # (synced before the rename, as every atomic write)
    return (dest / "config.yaml").is_file()


def runs_table(ctx: Context, results: Sequence[RunResult]) -> str:
    rows = []
    for r in results:
        c = r.spec.cfg
        records = ctx.out / "records" / r.spec.name
        name = (
            f"[{r.spec.name}]({rel(records, ctx)}/config.yaml)"
            if copy_records(r.run_dir, records)
            else r.spec.name
        )
        opts = ", ".join(f"{k}={v}" for k, v in c.model_options.items()) or "-"
        ips = mean_images_per_s(r)
        rows.append(
            [
                name,
                c.model,
                opts,
                c.seed,
                r.final.get("iter"),
                fmt(last(r, "train_error")),
                fmt(last(r, "test_error")),
                fmt(r.final.get("wall_time"), 0),
                "" if ips is None else f"{ips:.0f}",
                trained_on(r.run_dir),
                r.status + _stopped_early(r),
            ]
        )
    head = [
        "run (config)",
        "model",
        "options",
        "seed",
        "iters",
        "train err % (last interval)",
        "test err %",
        "train s",
        "img/s",
        "trained on",
        "this call",
    ]
    return markdown_table(head, rows)


def train_command(cfg: TrainConfig) -> str:
    """The `reslab train` command line that trains this run alone: every field that differs
    from TrainConfig's defaults as `--set key=value` (values in YAML/JSON syntax)."""
    default = TrainConfig().to_dict()
    argv = ["reslab", "train"]
    for key, value in cfg.to_dict().items():
        if key in ("out", "data", "device", "model_options") or value == default[key]:
            continue
        argv += ["--set", f"{key}={_yaml_value(value)}"]
    for key, value in cfg.model_options.items():
        argv += ["--set", f"model_options.{key}={_yaml_value(value)}"]
    argv += ["--data", cfg.data, "--out", cfg.out]
    if cfg.device != "auto":
        argv += ["--device", cfg.device]
    return shlex.join(argv)


def _yaml_value(value: Any) -> str:
    """A value as `--set` parses it (YAML): bare strings where YAML reads them back as strings."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)  # JSON is YAML: numbers, lists, true/false/null, quoted strings


def hardware_table() -> str:
    from reslab.engine.trainer import run_info

    info = run_info()
    return markdown_table(["", ""], [[k, v] for k, v in info.items()], align="ll")


def write_report(
    ctx: Context,
    title: str,
    plan: Plan,
    results: Sequence[RunResult],
    body: str,
    *,
    seconds: float,
) -> Path:
    seeds = sorted({r.spec.cfg.seed for r in results})
    train_s = sum(float(r.final.get("wall_time") or 0) for r in results)
    first = results[0].spec.cfg if results else None
    lines = [
        f"# {title}",
        "",
        f"Budget **{ctx.budget}**; written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC; this call took {seconds / 60:.1f} min (finished runs are reused, not retrained); "
        f"training time summed over the runs: {train_s / 60:.1f} min.",
        "",
        "## What ran",
        "",
        f"```bash\n{ctx.command}\n```",
        "",
        f"- {len(results)} training runs, seeds {seeds}; each run is a normal `reslab train` "
        f"run whose RUN_DIR (with its checkpoints) was `{ctx.runs_root}`/NAME; its small "
        "records (config.yaml, metrics.jsonl, final.json) are copied beside this report in "
        "[`records/`](records), which the Runs table links to.",
    ]
    if first is not None:
        lines.append(f"- data: CIFAR-10 from `{first.data}`; device `{ctx.device}`.")
    lines += [f"- {n}" for n in plan.notes]
    lines += ["", "## Results", "", body.strip(), "", "## Runs", "", runs_table(ctx, results)]
    lines += ["", "Each run alone, as a plain `reslab train` command:", "", "```bash"]
    lines += [train_command(r.spec.cfg) for r in results] + ["```"]
    lines += ["", "## Hardware and versions", "", hardware_table(), ""]
    path = ctx.out / "REPORT.md"
    from reslab.runtime.checkpoint import write_text_atomic

    write_text_atomic(path, "\n".join(lines))  # a kill keeps the previous report
    return path
