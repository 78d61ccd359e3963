"""Markdown tables for reports: our numbers beside the paper's, mean +/- std over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, align: str | None = None
) -> str:
    """A GitHub-flavoured markdown table; `align` has one of l/r/c per column (default: the
    first column left, the rest right). Cells are str()-ed; None renders as an empty cell."""
    n = len(headers)
    align = align or "l" + "r" * (n - 1)
    if len(align) != n or any(a not in "lrc" for a in align):
        raise ValueError(f"align must be {n} letters of l/r/c, got {align!r}")
    cells = [["" if c is None else str(c).replace("|", "\\|") for c in r] for r in rows]
    for i, r in enumerate(cells):
        if len(r) != n:
            raise ValueError(f"row {i} has {len(r)} cells, the header has {n}")
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
        *("| " + " | ".join(r) + " |" for r in cells),
    ]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1 in the denominator; 0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def fmt_mean_std(values: Sequence[float], *, digits: int = 2) -> str:
    """'6.61 ± 0.16' as the paper writes ResNet-110's 5 runs; a single value prints alone."""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_best_mean_std(values: Sequence[float], *, digits: int = 2) -> str:
    """'6.43 (6.61±0.16)': best, then mean ± std, as Table 6 writes ResNet-110's 5 runs (lowest
    is best: these are errors)."""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{min(values):.{digits}f} ({mean:.{digits}f}±{std:.{digits}f})"


def compare_table(
    results: Mapping[str, Sequence[float]],
    paper: Mapping[str, float | None],
    *,
    metric: str = "test error %",
    digits: int = 2,
    lower_is_better: bool = True,
) -> str:
    """One row per model: best and mean ± std over seeds beside the paper's value and the gap
    (ours best − paper). `results` maps a model label to its values over seeds."""
    rows = []
    for label, values in results.items():
        vals = [float(v) for v in values]
        if not vals:
            rows.append([label, "", "", "0", _num(paper.get(label), digits), ""])
            continue
        best = min(vals) if lower_is_better else max(vals)
        ref = paper.get(label)
        gap = "" if ref is None else f"{best - ref:+.{digits}f}"
        rows.append(
            [
                label,
                f"{best:.{digits}f}",
                fmt_mean_std(vals, digits=digits),
                str(len(vals)),
                _num(ref, digits),
                gap,
            ]
        )
    headers = [
        "model",
        f"{metric} (best)",
        f"{metric} (mean ± std)",
        "runs",
        "paper",
        "ours − paper",
    ]
    return markdown_table(headers, rows)


def _num(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"
