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
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start}; the file is damaged") from None
    rows: list[dict] = []
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
        for key, v in row.items():  # what tables and plots compute with must be numbers
            numeric = key in ("iter", "epoch", "lr") or key.endswith(("_error", "_top5", "_loss"))
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            if numeric and (not ok or (key == "iter" and not isinstance(v, int))):
                raise ValueError(f"{path}:{n}: {key} is {v!r}, not a number; the file is damaged")
        rows.append(row)
    return rows
