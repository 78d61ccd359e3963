"""What the curves show: axis units that fit the run, one dashed and one bold line per run, a
marker for a single evaluation, and a legend outside the axes that explains the line styles."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from reslab.analysis.plots import Run, draw_curves, plot_two_panel


def _rows(iters: list[int], start: float) -> list[dict]:
    return [{"iter": i, "train_error": start - k, "test_error": start - k + 2}
            for k, i in enumerate(iters)]  # fmt: skip


def test_short_run_axis_lines_legend_and_single_evaluation_marker() -> None:
    ax = Figure().add_subplot()
    runs = [Run("resnet20", _rows([100, 200, 300], 50.0)), Run("resnet56", _rows([300], 60.0))]
    draw_curves(ax, runs)
    assert ax.get_xlabel() == "iterations" and ax.get_ylabel() == "error (%)"
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len(lines) == 4  # a dashed training and a bold test line per run
    assert [ln.get_linestyle() for ln in lines] == ["--", "-", "--", "-"]
    assert list(lines[1].get_xdata()) == [100, 200, 300]
    assert lines[2].get_marker() == "o" and lines[3].get_marker() == "o"  # one evaluation
    assert lines[1].get_marker() in ("None", None, "")
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["resnet20", "resnet56", "dashed: training error", "bold: test error"]
    assert legend.get_bbox_to_anchor()._bbox.x0 > 1.0  # placed right of the axes


def test_axis_units_follow_the_run_length() -> None:
    for last, label, x in ((9000, "iterations (thousands)", 9.0),
                           (64000, "iterations (1e4, as in the paper)", 6.4)):  # fmt: skip
        ax = Figure().add_subplot()
        draw_curves(ax, [Run("r", _rows([last // 2, last], 30.0))], test_key="test_error")
        assert ax.get_xlabel() == label and ax.get_lines()[1].get_xdata()[-1] == x
    ax = Figure().add_subplot()
    draw_curves(ax, [Run("r", [{"iter": 5, "train_error": 3.0, "val_error": 4.0}])],
                test_key="val_error")  # fmt: skip
    assert ax.get_legend().get_texts()[-1].get_text() == "bold: validation error"


def test_two_panel_png_is_written(tmp_path: Path) -> None:
    out = plot_two_panel([Run("plain-20", _rows([100, 200], 40.0))],
                         [Run("ResNet-20", _rows([100, 200], 30.0))], out=tmp_path / "f.png")  # fmt: skip
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height > 200


def test_runs_without_a_test_set_are_drawn_against_validation() -> None:
    ax = Figure().add_subplot()
    rows = [{"iter": i, "train_error": 9.0, "val_error": 4.0} for i in (50, 62)]
    draw_curves(ax, [Run("resnet20", rows)])  # a fine-tuning run: val only
    bold = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata())]
    assert len(bold) == 1 and list(bold[0].get_ydata()) == [4.0, 4.0]
    assert ax.get_legend().get_texts()[-1].get_text() == "bold: validation error"


def test_a_folder_run_beside_cifar_runs_keeps_its_validation_curve() -> None:
    """Mixed runs had one key for all: test_error, so the folder run drew no bold line."""
    ax = Figure().add_subplot()
    folder = [{"iter": i, "train_error": 9.0, "val_error": 4.0} for i in (50, 62)]
    draw_curves(ax, [Run("resnet20", _rows([50, 62], 30.0)), Run("finetune", folder)])
    bold = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata())]
    assert [list(ln.get_ydata()) for ln in bold] == [[32.0, 31.0], [4.0, 4.0]]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["resnet20", "finetune (validation)", "dashed: training error",
                     "bold: test error"]  # fmt: skip
