"""The one reader of a RUN_DIR's metrics.jsonl (one JSON object per evaluation)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """metrics.jsonl of a RUN_DIR, one dict per evaluation, in file order. A last line torn by a
    kill is dropped; a bad line anywhere else is damage (ValueError naming the file and line).
    No file: [] when missing_ok (a run not started yet), else FileNotFoundError."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path}: no metrics.jsonl; is {run_dir} a reslab RUN_DIR?")
    rows, lines = [], path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves a partial last line
                break
            raise ValueError(f"{path}:{n}: not a JSON object; the file is damaged") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: not a JSON object; the file is damaged")
        rows.append(row)
    return rows
