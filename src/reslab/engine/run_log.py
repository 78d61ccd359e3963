"""Logs a run writes as it goes: RUN_DIR/steps.jsonl (one row per progress update) and, when
the tensorboard package is installed, TensorBoard scalars in RUN_DIR/tb."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class RunLog:
    """Main process only. Each row is one write of one line, flushed: a kill loses at most the
    line being written, and readers skip a torn last line (reslab.analysis.plots does)."""

    def __init__(self, out: Path, *, resume_step: int, tensorboard: bool = True) -> None:
        self.path = out / "steps.jsonl"
        _truncate(self.path, resume_step)
        self._f = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the optional tensorboard package
                print(
                    "reslab train: TensorBoard logging off (pip install tensorboard); "
                    f"steps.jsonl and metrics.jsonl are written as usual in {out}",
                    file=sys.stderr,
                )
            else:
                # purge_step drops events a resumed run is about to write again.
                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step or None)

    def step(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "iter":
                    self.tb.add_scalar(f"train/{k}", v, row["iter"])

    def evaluation(self, row: dict[str, Any]) -> None:
        if self.tb is None:
            return
        for k, v in row.items():
            if k.endswith(("_error", "_top5")) and not k.startswith("train"):
                self.tb.add_scalar(f"eval/{k}", v, row["iter"])
        self.tb.flush()

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def _truncate(path: Path, step: int) -> None:
    """Keep the rows up to `step` (a resumed run continues from there), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():  # damaged lines are dropped
        try:
            if json.loads(line)["iter"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill
    # (a temporary named as every atomic write's, which rundir.clean_stale_temps removes after
    # a kill: its own `.NAME.tmpPID` had stayed in the run directory for good)
    from reslab.runtime.checkpoint import write_text_atomic

    write_text_atomic(path, "".join(keep))
