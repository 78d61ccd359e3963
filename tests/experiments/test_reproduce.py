"""`reslab reproduce` at the smoke budget on real CIFAR-10: reports, figures, tables, reruns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from reslab.analysis.records import read_metrics
from reslab.analysis.significance import mcnemar
from reslab.cli import main
from reslab.experiments import reproduce
from reslab.experiments.runner import ConfigMismatch, Context, run_one


def _png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def _table_rows(report: str, first_cells: list[str]) -> list[list[str]]:
    """The markdown table rows whose first cell is one of `first_cells`, in report order."""
    rows = []
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cells:
            rows.append(cells)
    return rows


def _stamps(runs: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """Modification times of each smoke run's final.json and last.pt: a retrained run changes them."""
    return {n: tuple((runs / "smoke" / n / f).stat().st_mtime_ns for f in ("final.json", "last.pt"))
            for n in names}  # fmt: skip


def _statuses(report: str) -> dict[str, str]:
    """run name -> this call's status, from the Runs table."""
    return {m[1]: m[2] for m in re.finditer(r"^\| \[([^\]]+)\]\(.*\| (\w+) \|$", report, re.M)}


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """table6, fig6 and fig7 use the same ResNet runs at a budget: they share one --runs root."""
    return tmp_path_factory.mktemp("runs")


def _go(name: str, root: Path, out: Path, runs: Path | None = None) -> str:
    path = reproduce(name, budget="smoke", out=out, data=str(root), device="cpu", runs=runs,
                     progress=False)  # fmt: skip
    assert path == out / "REPORT.md"
    return path.read_text()


def test_table6_report_and_rerun_skips(cifar_root: Path, tmp_path: Path, shared_runs: Path):
    report = _go("table6", cifar_root, tmp_path / "t6", shared_runs)
    rows = _table_rows(report, ["ResNet-20", "ResNet-32", "ResNet-44"])
    assert [r[0] for r in rows] == ["ResNet-20", "ResNet-32"] * 2  # errors, then parameters
    assert rows[0][4] == "8.75" and rows[1][4] == "7.51"  # the paper's column
    assert rows[2][1:] == ["0.270M", "0.27M"] and "## Hardware and versions" in report
    assert "![training curves](table6.png)" in report
    for run, row in zip(("resnet20-s0", "resnet32-s0"), rows[:2], strict=True):
        final = json.loads((shared_runs / "smoke" / run / "final.json").read_text())
        assert final["iter"] == 12 and row[1] == row[2] == f"{final['test_error']:.2f}"
        wrong = final["test_error"] * 2.56  # images of the 256 evaluated
        assert row[3] == "1" and wrong == pytest.approx(round(wrong))
        assert (shared_runs / "smoke" / run / "last.pt").is_file()
    # McNemar on the 256 test images: the counts account for the gap, p is the test's.
    (pair,) = _table_rows(report, ["ResNet-20 vs ResNet-32"])
    (e0, e1), a, b = map(float, pair[1].split(" vs ")), int(pair[2]), int(pair[3])
    assert e1 - e0 == pytest.approx(100 * (a - b) / 256, abs=0.011)
    right = torch.tensor([True] * a + [False] * b)
    assert pair[4] == f"{mcnemar(right, ~right).p:.2g}"
    assert pair[5] == ("yes" if float(pair[4]) < 0.05 else "no")
    _png(tmp_path / "t6" / "table6.png")
    assert "reslab reproduce table6 --budget smoke" in report
    # Every link in the report reaches a file beside it: the runs' small records, no checkpoint.
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert "records/resnet20-s0/config.yaml" in links
    assert all((tmp_path / "t6" / link).exists() for link in links), links
    assert sorted(p.name for p in (tmp_path / "t6" / "records" / "resnet20-s0").iterdir()) == [
        "config.yaml", "final.json", "metrics.jsonl"]  # fmt: skip
    assert "Monotonically falling with depth: not judged (smoke budget" in report
    assert "**yes**" not in report and "**no**" not in report  # a smoke report judges no claim
    stamps = _stamps(shared_runs, ["resnet20-s0", "resnet32-s0"])
    again = _go("table6", cifar_root, tmp_path / "t6", shared_runs)
    assert _statuses(again) == {"resnet20-s0": "skipped", "resnet32-s0": "skipped"}
    assert _stamps(shared_runs, ["resnet20-s0", "resnet32-s0"]) == stamps  # not retrained


@pytest.mark.slow  # ~20 s each on a 2-core Zen 3; every target's plan: test_plans.py
def test_fig6_and_fig7_share_runs(cifar_root: Path, tmp_path: Path, shared_runs: Path) -> None:
    runs = ["plain20-s0", "plain32-s0", "resnet20-s0", "resnet32-s0"]
    done = {r: (shared_runs / "smoke" / r / "final.json").is_file() for r in runs}  # by table6
    report = _go("fig6", cifar_root, tmp_path / "f6", shared_runs)
    assert _statuses(report) == {r: "skipped" if done[r] else "trained" for r in runs}
    assert not done["plain20-s0"] and not done["plain32-s0"]
    _png(tmp_path / "f6" / "fig6.png")
    names = ["plain-20", "plain-32", "ResNet-20", "ResNet-32"]
    assert [r[0] for r in _table_rows(report, names)] == names
    claims = _table_rows(report, ["deeper plain nets have HIGHER training error (degradation)",
                                  "deeper ResNets have LOWER training error",
                                  "deeper ResNets have LOWER test error"])  # fmt: skip
    assert [c[2] for c in claims] == ["not judged (smoke budget: too few iterations)"] * 3
    stamps = _stamps(shared_runs, runs)
    report7 = _go("fig7", cifar_root, tmp_path / "f7", shared_runs)
    _png(tmp_path / "f7" / "fig7.png")
    assert _statuses(report7) == dict.fromkeys(runs, "skipped")  # fig6 trained all four
    assert _stamps(shared_runs, runs) == stamps
    rows = {r[0]: r for r in _table_rows(report7, names)}
    assert [rows[n][1] for n in names] == ["19", "31", "19", "31"]  # 3x3 layers: 6n+1
    assert "**yes**" not in report7 and "**no**" not in report7
    # --only one kind: the runs are reused, the figure is one panel
    path = reproduce("fig6", budget="smoke", out=tmp_path / "f6r", data=str(cifar_root),
                     device="cpu", runs=shared_runs, progress=False,
                     only=["resnet20-s0", "resnet32-s0"])  # fmt: skip
    report = path.read_text()
    assert _statuses(report) == {"resnet20-s0": "skipped", "resnet32-s0": "skipped"}
    assert [r[0] for r in _table_rows(report, names)] == ["ResNet-20", "ResNet-32"]
    assert _stamps(shared_runs, runs) == stamps
    _png(tmp_path / "f6r" / "fig6.png")


@pytest.mark.slow  # ~20 s each on a 2-core Zen 3; every target's plan: test_plans.py
def test_shortcuts(cifar_root: Path, tmp_path: Path) -> None:
    report = _go("shortcuts", cifar_root, tmp_path / "sc")
    _png(tmp_path / "sc" / "shortcuts.png")
    assert _statuses(report) == dict.fromkeys(["resnet32-s0", "resnet32-B-s0", "resnet32-C-s0"],
                                              "trained")  # fmt: skip
    rows = _table_rows(report, ["ResNet-32"])
    assert [r[1] for r in rows[:3]] == ["A", "B", "C"] and len(rows) == 4  # + the ordering row
    assert [r[3] for r in rows[:3]] == ["1"] * 3  # runs per option
    assert rows[3][2] == "not judged (smoke budget: too few iterations)"  # 12 iterations
    assert rows[3][1] == " / ".join(r[2] for r in rows[:3])  # the means of the table above


@pytest.mark.slow  # ~20 s each on a 2-core Zen 3; every target's plan: test_plans.py
def test_alexnet_parts(cifar_root: Path, tmp_path: Path) -> None:
    report = _go("alexnet-parts", cifar_root, tmp_path / "ap")
    _png(tmp_path / "ap" / "alexnet_parts.png")
    variants = ["all", "no-lrn", "no-overlap", "no-dropout", "no-pca"]
    rows = _table_rows(report, variants)
    assert [r[0] for r in rows] == variants
    assert [r[4] for r in rows] == [""] + ["not judged (smoke budget: too few iterations)"] * 4
    assert _statuses(report) == {f"alexnet-{v}-s0": "trained" for v in variants}
    runs = tmp_path / "ap" / "runs" / "smoke"
    assert "pca_lighting: true" in (runs / "alexnet-all-s0" / "config.yaml").read_text()
    assert "pca_lighting: false" in (runs / "alexnet-no-pca-s0" / "config.yaml").read_text()


def test_relu_tanh_resumes_an_interrupted_run_via_the_cli(
    cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reslab.experiments import relu_tanh

    out = tmp_path / "rt"
    ctx = Context("relu-tanh", "smoke", out, out / "runs" / "smoke", 1, str(cifar_root), "cpu",
                  "", progress=False)  # fmt: skip
    spec = relu_tanh.plan(ctx).specs[0]
    spec.cfg.data, spec.cfg.device = str(cifar_root), "cpu"
    spec.cfg.time_limit = 1e-9  # stops after the first iteration, as a killed run would
    cut = run_one(spec, runs_root=ctx.runs_root, progress=False)
    assert cut.final["iter"] == 1
    argv = ["reproduce", "relu-tanh", "--budget", "smoke", "--out", str(out),
            "--data", str(cifar_root), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = (out / "REPORT.md").read_text()
    assert _statuses(report) == {"relu-lr0.01-s0": "resumed", "tanh-lr0.01-s0": "trained"}
    assert [r["iter"] for r in read_metrics(ctx.runs_root / "relu-lr0.01-s0")] == [1, 4, 8, 12]
    (row,) = _table_rows(report, ["25%"])
    assert row[4] == "6x" and "**yes**" not in report and "**no**" not in report
    _png(out / "relu_tanh.png")
    stamps = _stamps(ctx.runs_root.parent, ["relu-lr0.01-s0", "tanh-lr0.01-s0"])
    assert main(argv) == 0
    skipped = {"relu-lr0.01-s0": "skipped", "tanh-lr0.01-s0": "skipped"}
    assert _statuses((out / "REPORT.md").read_text()) == skipped
    assert _stamps(ctx.runs_root.parent, ["relu-lr0.01-s0", "tanh-lr0.01-s0"]) == stamps
    capsys.readouterr()
    assert main([*argv, "--dry-run", "--seeds", "2"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^relu-lr0\.01-s0 .* finished$", listing, re.M)
    assert re.search(r"^tanh-lr0\.01-s1 .* new$", listing, re.M)
    assert not (out / "runs" / "smoke" / "tanh-lr0.01-s1").exists()


def test_dry_run_says_where_a_killed_run_resumes(cifar_root: Path, tmp_path: Path,
                                                 capsys) -> None:  # fmt: skip
    """A run killed mid-way (last.pt, no final.json) is listed with the iteration it resumes
    from; one whose last.pt is damaged is listed as refused, with the reason."""
    from reslab.experiments import relu_tanh

    out = tmp_path / "rt"
    ctx = Context("relu-tanh", "smoke", out, out / "runs" / "smoke", 1, str(cifar_root), "cpu",
                  "", progress=False)  # fmt: skip
    relu, tanh = relu_tanh.plan(ctx).specs
    for spec in (relu, tanh):
        spec.cfg.data, spec.cfg.device = str(cifar_root), "cpu"
        spec.cfg.time_limit = 1e-9  # one iteration, then last.pt and final.json
        run_one(spec, runs_root=ctx.runs_root, progress=False)
        (ctx.runs_root / spec.name / "final.json").unlink()  # as if killed after last.pt
    last = ctx.runs_root / tanh.name / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    argv = ["reproduce", "relu-tanh", "--budget", "smoke", "--out", str(out),
            "--data", str(cifar_root), "--device", "cpu", "--dry-run"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^relu-lr0\.01-s0 .* resume \(from iteration 1\)$", listing, re.M)
    assert re.search(r"^tanh-lr0\.01-s0 .* REFUSED: .*last\.pt: cannot be loaded", listing, re.M)


def test_a_run_dir_with_another_config_is_refused(cifar_root: Path, tmp_path: Path) -> None:
    from reslab.experiments import relu_tanh

    ctx = Context("relu-tanh", "smoke", tmp_path, tmp_path / "runs", 1, str(cifar_root), "cpu",
                  "", progress=False)  # fmt: skip
    spec = relu_tanh.plan(ctx).specs[0]
    spec.cfg.data, spec.cfg.device, spec.cfg.time_limit = str(cifar_root), "cpu", 1e-9
    run_one(spec, runs_root=ctx.runs_root, progress=False)
    spec.cfg.lr = 0.02
    with pytest.raises(ConfigMismatch, match=r"lr: 0\.01 there, 0\.02 now"):
        run_one(spec, runs_root=ctx.runs_root, progress=False)


def test_a_diverged_run_is_reported_not_fatal(cifar_root: Path, tmp_path: Path) -> None:
    from reslab.experiments import relu_tanh

    ctx = Context("relu-tanh", "smoke", tmp_path, tmp_path / "runs", 1, str(cifar_root), "cpu",
                  "", progress=False)  # fmt: skip
    spec = relu_tanh.plan(ctx).specs[0]
    spec.cfg.data, spec.cfg.device, spec.cfg.lr = str(cifar_root), "cpu", 1e30
    res = run_one(spec, runs_root=ctx.runs_root, progress=False)
    assert res.status == "diverged" and res.final == {}
    assert not (ctx.runs_root / spec.name / "final.json").exists()


def _rows_by_label(text: str) -> dict[str, list[int]]:
    """{label: [iteration of each printed evaluation row]} from the lines 'LABEL: iter N | ...'."""
    rows: dict[str, list[int]] = {}
    for line in text.splitlines():
        if "| train err" in line:
            m = re.match(r"(.+?): iter (\d+) \|", line)
            assert m, f"an evaluation row without its run's name: {line!r}"
            rows.setdefault(m.group(1), []).append(int(m.group(2)))
    return rows


def test_jobs_train_runs_in_parallel_processes(cifar_root: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "rt"
    path = reproduce("relu-tanh", budget="smoke", out=out, data=str(cifar_root), device="cpu",
                     jobs=2, progress=False)  # fmt: skip
    report = path.read_text()
    assert _statuses(report) == {"relu-lr0.01-s0": "trained", "tanh-lr0.01-s0": "trained"}
    assert "--jobs 2" in report
    for run in ("relu-lr0.01-s0", "tanh-lr0.01-s0"):
        assert [r["iter"] for r in read_metrics(out / "runs" / "smoke" / run)] == [4, 8, 12]
    # Quiet runs side by side: every row the workers print names its run.
    assert _rows_by_label(capfd.readouterr().out) == {
        "relu-lr0.01-s0": [4, 8, 12], "tanh-lr0.01-s0": [4, 8, 12]}  # fmt: skip


def test_quiet_rows_name_their_runs_one_by_one_and_fused(cifar_root: Path, tmp_path: Path,
                                                          capsys) -> None:  # fmt: skip
    """Without progress there is no "run i/N" or group header: each row names its run(s)."""
    opts = dict(budget="smoke", data=str(cifar_root), device="cpu", progress=False)
    # Table 6's ResNet-20 runs: the smallest nets a table trains (3 runs of 12 iterations).
    reproduce("table6", out=tmp_path / "one", only=["resnet20-s0"], fused=False, **opts)
    assert _rows_by_label(capsys.readouterr().out) == {"resnet20-s0": [4, 8, 12]}
    reproduce("table6", out=tmp_path / "two", seeds=2, only=["resnet20-s0", "resnet20-s1"],
              fused=True, **opts)  # fmt: skip
    assert _rows_by_label(capsys.readouterr().out) == {
        "fused resnet20-s0, resnet20-s1": [4, 8, 12]}  # fmt: skip


def test_a_time_limited_run_is_marked_stopped_then_resumed(cifar_root: Path, tmp_path: Path):
    opts = dict(budget="smoke", out=tmp_path, data=str(cifar_root), device="cpu", progress=False)
    report = reproduce("relu-tanh", time_limit=1e-9, **opts).read_text()  # one iteration each
    assert report.count("STOPPED at 1 of 12 iterations (time limit)") == 2
    assert "--time-limit 1e-09" in report
    report = reproduce("relu-tanh", **opts).read_text()
    assert "STOPPED" not in report
    assert _statuses(report) == {"relu-lr0.01-s0": "resumed", "tanh-lr0.01-s0": "resumed"}
    for run in ("relu-lr0.01-s0", "tanh-lr0.01-s0"):  # continued from iteration 1, not redone
        assert [r["iter"] for r in read_metrics(tmp_path / "runs" / "smoke" / run)] == [1, 4, 8, 12]


def test_missing_data_is_named_before_anything_is_created(tmp_path: Path, capsys) -> None:
    """A reproduce call on a machine without CIFAR leaves no empty OUT/runs/ behind."""
    root = tmp_path / "data"
    out = tmp_path / "out"
    argv = ["reproduce", "table6", "--budget", "smoke", "--out", str(out), "--data", str(root),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "reslab data download" in err and str(root) in err
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for n in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "batches.meta"]:
        (root / "cifar-10-batches-py" / n).write_bytes(b"")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data_batch_5 is missing" in err and "Traceback" not in err
    assert not out.exists()
