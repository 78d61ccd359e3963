"""Training curves in the style of the paper's Figure 6, and confusion matrices, as PNG files.

Uses matplotlib's object API with the Agg canvas directly (no pyplot), so importing or plotting
never touches a display or global backend state.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reslab.analysis.records import read_metrics


@dataclass
class Run:
    """One training run's curves: metrics.jsonl rows (dicts) and a legend label."""

    label: str
    rows: list[dict]


def run_label(run_dir: str | Path) -> str:
    """The model name from the run's config.yaml when there is one, else the directory name."""
    cfg = Path(run_dir) / "config.yaml"
    if cfg.is_file():
        from reslab.runtime.yaml_file import YamlFileError, read_yaml

        try:
            data = read_yaml(cfg) or {}
        except YamlFileError:
            data = {}  # only the label comes from it: the directory's name will do
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, str) and model:
            return model
    return Path(run_dir).resolve().name


def load_run(run_dir: str | Path, *, label: str | None = None) -> Run:
    return Run(label or run_label(run_dir), read_metrics(run_dir))


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Several RUN_DIRs; labels that repeat (seeds of one model) get the directory name added."""
    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    for run, d in zip(runs, run_dirs):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({Path(d).resolve().name})"
    return runs


def x_unit(max_iter: float) -> tuple[float, str]:
    """(divisor, axis label) for iterations: the paper's 1e4 for paper-length runs, 1e3 or plain
    iterations for short ones (a 300-iteration run would otherwise span 0 to 0.03)."""
    if max_iter >= 20_000:
        return 1e4, "iterations (1e4, as in the paper)"
    if max_iter >= 2_000:
        return 1e3, "iterations (thousands)"
    return 1.0, "iterations"


def _series(rows: list[dict], key: str, scale: float) -> tuple[list[float], list[float]]:
    pts = [(r["iter"], r[key]) for r in rows if r.get(key) is not None and "iter" in r]
    return [p[0] / scale for p in pts], [float(p[1]) for p in pts]


def draw_curves(
    ax: Axes, runs: Sequence[Run], *, test_key: str | None = None, title: str | None = None
) -> None:
    """Figure 6 style on one axes: thin dashed training error, bold test error, one colour per
    run; x = iterations in units that suit the longest run, y = error %. A series with a single
    point is drawn as a marker (a line needs two). The legend sits outside the axes, so it never
    covers a curve, and ends with two black entries that say which line style is which."""
    if test_key is None:
        # Each run's test error; a run without a test set (fine-tuning on a folder) is drawn
        # against validation, and its legend entry says so.
        keys = [
            "test_error" if any(r.get("test_error") is not None for r in run.rows) else "val_error"
            for run in runs
        ]
    elif not any(r.get(test_key) is not None for run in runs for r in run.rows):
        # A misspelt field would draw no bold line under a legend that promises one.
        known = sorted({k for run in runs for r in run.rows for k in r
                        if k.endswith(("_error", "_top5", "_loss"))})  # fmt: skip
        raise ValueError(f"no run's metrics.jsonl has {test_key!r}; fields to draw: {known}")
    else:
        keys = [test_key] * len(runs)
    mixed = len(set(keys)) > 1
    colors = [f"C{i % 10}" for i in range(len(runs))]
    last_iter = max((r.get("iter", 0) for run in runs for r in run.rows), default=0)
    scale, xlabel = x_unit(last_iter)
    for run, color, key in zip(runs, colors, keys):
        tx, ty = _series(run.rows, "train_error", scale)
        vx, vy = _series(run.rows, key, scale)
        if not tx and not vx:
            raise ValueError(f"run {run.label!r} has no train_error or {key} values to plot")
        if tx:
            ax.plot(tx, ty, color=color, linestyle="--", linewidth=0.8, clip_on=len(tx) > 1,
                    marker="o" if len(tx) == 1 else None, markersize=4, fillstyle="none")  # fmt: skip
        # A lone marker at 0% error would be cut in half by the axis: drawn unclipped.
        label = f"{run.label} (validation)" if mixed and key.startswith("val") else run.label
        ax.plot(vx, vy, color=color, linewidth=2.2, label=label, clip_on=len(vx) > 1,
                marker="o" if len(vx) == 1 else None, markersize=6)  # fmt: skip
    split = "validation" if all(k.startswith("val") for k in keys) else "test"
    ax.plot([], [], color="black", linestyle="--", linewidth=0.8, label="dashed: training error")
    ax.plot([], [], color="black", linewidth=2.2, label=f"bold: {split} error")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("error (%)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)


def save_figure(fig: Figure, out: str | Path) -> Path:
    from reslab.runtime.checkpoint import write_file_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # Atomic: a kill while an earlier PNG of the same name is rewritten must not leave it empty.
    write_file_atomic(out, lambda f: fig.savefig(f, dpi=120, format="png", bbox_inches="tight",
                                                 pad_inches=0.1))  # fmt: skip
    return out


def plot_curves(
    runs: Sequence[Run],
    *,
    out: str | Path,
    title: str | None = None,
    test_key: str | None = None,
) -> Path:
    """Several runs on one Figure-6-style panel, written to a PNG."""
    if not runs:
        raise ValueError("no runs to plot")
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    draw_curves(fig.add_subplot(), runs, test_key=test_key, title=title)
    return save_figure(fig, out)


def plot_two_panel(
    plain: Sequence[Run],
    resnets: Sequence[Run],
    *,
    out: str | Path,
    titles: tuple[str, str] = ("plain networks", "ResNets"),
    test_key: str | None = None,
) -> Path:
    """The paper's Figure 6 layout: plain nets left, ResNets right, shared y range."""
    if not plain or not resnets:
        raise ValueError("the two-panel figure needs plain runs and ResNet runs")
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    draw_curves(left, plain, test_key=test_key, title=titles[0])
    draw_curves(right, resnets, test_key=test_key, title=titles[1])
    right.yaxis.set_tick_params(labelleft=True)
    return save_figure(fig, out)


def plot_confusion(
    confusion: torch.Tensor,
    *,
    classes: Sequence[str] | None,
    out: str | Path,
    title: str | None = None,
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) as a heat map;
    counts are written in the cells for up to 20 classes."""
    conf = confusion.detach().to(torch.float64).cpu()
    c = conf.shape[0]
    rates = conf / conf.sum(1, keepdim=True).clamp_min(1)
    side = min(14.0, 3.0 + 0.45 * c)
    fig = Figure(figsize=(side, side * 0.9), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    xlabel = "predicted"
    if c <= 20:
        # A class folder whose name is not UTF-8 reaches here with surrogate escapes, which no
        # font can draw: shown with a replacement character instead.
        names = [str(n).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                 for n in (classes or range(c))]  # fmt: skip
        names, family = drawable_labels(names)
        if any(n != f"class {i}" and names[i] == f"class {i}" for i, n in enumerate(classes or ())):
            xlabel += " (class numbers: no installed font draws those names' script)"
        ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=8, fontfamily=family)
        ax.set_yticks(range(c), names, fontsize=8, fontfamily=family)
        for i in range(c):
            for j in range(c):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(
                    j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=7, color=color
                )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return save_figure(fig, out)


def drawable_labels(names: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(labels, font families) for tick labels: the names as they are with matplotlib's default
    font where it draws every character (families None); else with an installed font that draws
    the rest added as its fallback (class folders named in Korean, Chinese, ...); else, where no
    installed font does, "class i" for each name it cannot draw. Matplotlib would draw empty
    boxes and print a "Glyph ... missing" warning for each character instead."""
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties())
    missing = {ch for n in names for ch in n if ord(ch) not in _charmap(default)}
    if not missing:
        return list(names), None
    fallback = _font_drawing(frozenset(missing))
    if fallback is not None:
        return list(names), [font_manager.FontProperties(fname=default).get_name(), fallback]
    return [f"class {i}" if set(n) & missing else n for i, n in enumerate(names)], None


@functools.lru_cache(maxsize=64)
def _charmap(path: str) -> frozenset[int]:
    """The code points the font file at `path` has glyphs for (empty if it cannot be read)."""
    from matplotlib import ft2font

    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@functools.lru_cache(maxsize=16)
def _font_drawing(chars: frozenset[str]) -> str | None:
    """The family name of an installed font with glyphs for all of `chars`, or None."""
    from matplotlib import font_manager

    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith("Last Resort"):
            continue  # (matplotlib's own: a box with the code point's block for every character)
        if all(ord(ch) in _charmap(entry.fname) for ch in chars):
            return entry.name
    return None
