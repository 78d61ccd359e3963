"""Training curves of several runs side by side, against wall-clock minutes and against epochs.

Reads each RUN_DIR's steps.jsonl (training loss/error at each progress update) and
metrics.jsonl (evaluations), and draws the training error (moving average) as a thin line and
each test error as a bold marker with its value. Used for issue #17's comparison of full-size
and progressive-resizing runs:

    python scripts/plot_wall_curves.py results/resnet20-cpu-28epochs-flip \
        results/resnet20-cpu-progressive/28epochs results/resnet20-cpu-progressive/30epochs \
        --out results/resnet20-cpu-progressive/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(v: list[float], k: int = 15) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x - (v[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_t, ax_e = fig.subplots(1, 2, sharey=True)
    for i, (run, label) in enumerate(zip(args.runs, labels, strict=True)):
        color = f"C{i % 10}"
        steps = _rows(run / "steps.jsonl")
        evals = [r for r in _rows(run / "metrics.jsonl") if r.get("test_error") is not None]
        err = _smooth([r["error"] for r in steps])
        ax_t.plot([r["wall_time"] / 60 for r in steps], err, color=color, lw=0.9, label=label)
        ax_e.plot([r["epoch"] for r in steps], err, color=color, lw=0.9, label=label)
        for r in evals:
            for ax, x in ((ax_t, r["wall_time"] / 60), (ax_e, r["epoch"])):
                ax.plot([x], [r["test_error"]], "o", color=color, ms=6)
                ax.annotate(f"{r['test_error']:.2f}", (x, r["test_error"]), fontsize=7,
                            xytext=(4, 4 + 8 * i), textcoords="offset points", color=color)  # fmt: skip
    ax_t.set_xlabel("wall-clock minutes of training")
    ax_e.set_xlabel("epochs")
    ax_t.set_ylabel("error (%): lines training (moving average), dots test")
    for ax in (ax_t, ax_e):
        ax.set_ylim(0, 40)
        ax.set_xlim(left=0)
        ax.grid(True, lw=0.3, alpha=0.5)
    ax_e.legend(fontsize=8, frameon=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(args.out, dpi=120, format="png", bbox_inches="tight")
    print(args.out)


if __name__ == "__main__":
    main()
