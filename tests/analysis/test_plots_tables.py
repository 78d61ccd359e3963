"""Figure-6 curves and confusion PNGs from real metrics files; markdown report tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from reslab.analysis.plots import load_run, load_runs, plot_confusion, plot_curves, plot_two_panel
from reslab.analysis.tables import compare_table, fmt_mean_std, markdown_table, mean_std
from reslab.cli import main


def _check_png(path: Path, *, min_side: int = 400) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    with Image.open(path) as im:
        im.load()
        assert min(im.size) >= min_side
        assert len(im.convert("L").getcolors(1 << 16) or []) > 10


def _run_dir(root: Path, name: str, model: str, final: float, *, partial: bool = False) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(f"model: {model}\nlr: 0.1\n")
    lines = []
    for k in range(1, 11):
        it = k * 1000
        lines.append(json.dumps({"iter": it, "epoch": k, "lr": 0.1,
                                 "train_error": final + 60 / k - 5, "test_error": final + 50 / k,
                                 "test_top5": 1.0}))  # fmt: skip
    text = "\n".join(lines) + "\n" + ('{"iter": 11000, "train_e' if partial else "")
    (d / "metrics.jsonl").write_text(text)
    return d


def test_curves_one_and_two_panels(tmp_path: Path) -> None:
    a = _run_dir(tmp_path, "r20", "resnet20", 9.0)
    b = _run_dir(tmp_path, "r56", "resnet56", 7.0, partial=True)  # killed mid-write
    p = _run_dir(tmp_path, "p20", "plain20", 11.0)
    runs = [load_run(a), load_run(b)]
    assert [r.label for r in runs] == ["resnet20", "resnet56"] and len(runs[1].rows) == 10
    _check_png(plot_curves(runs, out=tmp_path / "one.png", title="CIFAR-10"))
    _check_png(plot_two_panel([load_run(p)], runs, out=tmp_path / "fig6.png"))
    c = _run_dir(tmp_path, "r20_seed1", "resnet20", 8.0)
    assert [r.label for r in load_runs([a, c, p])] == [
        "resnet20 (r20)",
        "resnet20 (r20_seed1)",
        "plain20",
    ]


def test_plot_cli_and_bad_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _run_dir(tmp_path, "r20", "resnet20", 9.0)
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(a), str(a), "--out", str(out)]) == 0
    _check_png(out)
    assert main(["plot", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    before = out.read_bytes()
    assert main(["plot", str(a), "--test-key", "test_eror", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no run's metrics.jsonl has 'test_eror'" in err and "'test_error'" in err
    assert out.read_bytes() == before  # nothing drawn, nothing overwritten
    assert main(["plot", str(a), "--test-key", "test_top5", "--out", str(out)]) == 0
    (a / "metrics.jsonl").write_text('{"iter": 1}\nnot json\n{"iter": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        load_run(a)
    for row, needle in (('{"iter": 1, "train_error": {"a": 1}}', "train_error is {'a': 1}"),
                        ('{"iter": "x", "test_error": 5}', "iter is 'x', not a number")):  # fmt: skip
        (a / "metrics.jsonl").write_text(row + '\n{"iter": 2}\n')
        assert main(["plot", str(a), "--out", str(tmp_path / "x.png")]) == 2
        assert needle in capsys.readouterr().err
    (a / "metrics.jsonl").write_bytes(b'{"iter": 1}\n\xff\xfe\n')
    assert main(["plot", str(a), "--out", str(tmp_path / "x.png")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_confusion_png(tmp_path: Path) -> None:
    conf = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 6]])
    _check_png(plot_confusion(conf, classes=["cat", "dog", "ship"], out=tmp_path / "c.png"),
               min_side=300)  # fmt: skip
    big = torch.randint(0, 9, (100, 100))  # CIFAR-100 size: no per-cell text, still a picture
    _check_png(plot_confusion(big, classes=None, out=tmp_path / "c100.png"))


def test_tables_exact() -> None:
    t = markdown_table(["model", "err"], [["resnet20", "8.75"], ["a|b", None]])
    assert t == "| model | err |\n|:--|--:|\n| resnet20 | 8.75 |\n| a\\|b |  |"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        markdown_table(["a", "b"], [["x"]])
    vals = [6.43, 6.61, 6.8, 6.55, 6.66]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    assert fmt_mean_std(vals) == f"{m:.2f} ± {s:.2f}" and fmt_mean_std([8.1]) == "8.10"
    table = compare_table({"resnet110": vals, "resnet20": [8.9]},
                          {"resnet110": 6.43, "resnet20": 8.75})  # fmt: skip
    lines = table.splitlines()
    assert lines[2] == f"| resnet110 | 6.43 | {m:.2f} ± {s:.2f} | 5 | 6.43 | +0.00 |"
    assert lines[3] == "| resnet20 | 8.90 | 8.90 | 1 | 8.75 | +0.15 |"


def test_confusion_png_with_a_class_name_that_is_not_utf8(tmp_path: Path) -> None:
    import os

    name = os.fsdecode(b"caf\xe9")  # a folder name from a Latin-1 file system
    conf = torch.tensor([[3, 1], [0, 4]])
    _check_png(plot_confusion(conf, classes=[name, "tea"], out=tmp_path / "c.png"), min_side=200)


def test_confusion_png_with_class_names_no_installed_font_draws(tmp_path: Path) -> None:
    """Hangul class names (a Korean user's folders) without a Korean font installed: no
    "Glyph missing" warnings, class numbers on the axes; names the default font draws stay."""
    import warnings

    from reslab.analysis import plots

    names = ["고양이", "café", "개"]
    labels, family = plots.drawable_labels(names)
    assert labels[1] == "café"
    if family is not None:  # a font with Hangul is installed here: the names as they are
        assert labels == names
        # (not matplotlib's own Last Resort font, which draws every character as a box)
        assert not family[1].startswith("Last Resort")
    else:
        assert labels == ["class 0", "café", "class 2"]
    conf = torch.tensor([[3, 1, 0], [0, 4, 1], [1, 0, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Glyph ... missing" would fail here
        _check_png(plot_confusion(conf, classes=names, out=tmp_path / "k.png"), min_side=200)
    assert plots.drawable_labels(["cat", "dog"]) == (["cat", "dog"], None)


def test_plot_leaves_out_a_run_not_yet_evaluated(tmp_path: Path, capsys) -> None:
    """A run still starting (empty metrics.jsonl) beside finished ones: the others are drawn and
    one line names the folder left out; alone it is one line with the fix (it had refused the
    whole plot with a line naming neither; helper audit D, bug 9)."""
    a = _run_dir(tmp_path, "r20", "resnet20", 9.0)
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / "metrics.jsonl").write_text("")
    out = tmp_path / "c.png"
    assert main(["plot", str(a), str(starting), "--out", str(out)]) == 0
    _check_png(out)
    err = capsys.readouterr().err
    assert (
        err.strip() == f"reslab plot: left out {starting}: no evaluation in its metrics.jsonl yet"
    )
    assert main(["plot", str(starting), "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert str(starting) in err and "--eval-every" in err and len(err.strip().splitlines()) == 1
