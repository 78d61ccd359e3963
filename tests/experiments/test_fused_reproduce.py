"""`reslab reproduce --seeds K` with fused seeds: one run directory per seed, Table 6 style."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reslab.cli import main
from reslab.engine.eval_run import load_checkpoint_model
from reslab.experiments.fused_runs import group_specs
from reslab.experiments.runner import make_plan, reproduce


@pytest.mark.slow  # ~60 s on the loaded 2-core CPU: two fused smoke groups, twice
def test_table6_seeds_trained_fused_then_reused(cifar_root: Path, tmp_path: Path) -> None:
    opts = dict(budget="smoke", out=tmp_path / "t6", data=str(cifar_root), device="cpu",
                seeds=2, fused=True, progress=False)  # fmt: skip
    report = reproduce("table6", **opts).read_text()
    assert report.count("trained (fused x2)") == 4  # resnet20 s0/s1 and resnet32 s0/s1
    assert "seeds trained as one fused net per configuration (--fused" in report
    assert re.search(r"best \(mean±std\) over seeds: ResNet-20 \d+\.\d\d \(\d+\.\d\d±\d+\.\d\d\)",
                     report)  # fmt: skip
    runs = tmp_path / "t6" / "runs" / "smoke"
    for name in ("resnet20-s0", "resnet20-s1", "resnet32-s0", "resnet32-s1"):
        assert json.loads((runs / name / "final.json").read_text())["iter"] == 12
        loaded = load_checkpoint_model(runs / name / "last.pt", device="cpu")
        assert type(loaded.model).__name__ == "CifarResNet"
    a = load_checkpoint_model(runs / "resnet20-s0" / "last.pt", device="cpu").model
    b = load_checkpoint_model(runs / "resnet20-s1" / "last.pt", device="cpu").model
    assert not a.conv1.weight.equal(b.conv1.weight)  # two seeds, two nets
    # `reslab eval` takes the members' checkpoints unchanged (here as a two-seed ensemble).
    ckpts = [str(runs / f"resnet20-s{s}" / "last.pt") for s in (0, 1)]
    assert main(["eval", "--checkpoint", *ckpts, "--data", str(cifar_root), "--limit", "30",
                 "--out", str(tmp_path / "ev")]) == 0  # fmt: skip
    again = reproduce("table6", **opts).read_text()
    assert "(fused" not in again.split("## Runs")[-1] and "| skipped |" in again


def test_fused_default_and_flag_are_recorded_in_the_plan(tmp_path: Path) -> None:
    _, _, plan = make_plan("table6", budget="cpu-xl", out=tmp_path, seeds=2, device="cpu")
    assert not plan.fused  # measured slower on the CPU: the default says so in the notes
    assert any("one after another (this device's default; fused on this device: slower" in n
               for n in plan.notes)  # fmt: skip
    _, _, plan = make_plan("table6", budget="cpu-xl", out=tmp_path, seeds=5, device="cpu",
                           fused=True)  # fmt: skip
    assert plan.fused
    groups = group_specs(plan.specs)
    assert [[s.name for s in g] for g in groups] == [
        [f"resnet{d}-s{s}" for s in range(5)] for d in (20, 56)
    ]
    _, _, off = make_plan("table6", budget="cpu-xl", out=tmp_path, seeds=5, device="cpu",
                          fused=False)  # fmt: skip
    assert not off.fused and any("one after another (--fused" in n for n in off.notes)
    _, _, one = make_plan("table6", budget="cpu-xl", out=tmp_path, device="cpu")
    assert not one.fused
    _, _, gpu = make_plan("table6", budget="full", out=tmp_path, seeds=5, device="cuda")
    assert gpu.fused and any("faster on an NVIDIA H200" in n for n in gpu.notes)
    _, _, six = make_plan("table6", budget="full", out=tmp_path, seeds=6, device="cuda")
    assert not six.fused  # K=6 was not measured on the card


def test_cli_dry_run_with_fused_flag(tmp_path: Path, capsys) -> None:
    argv = ["reproduce", "table6", "--budget", "smoke", "--out", str(tmp_path), "--device", "cpu"]
    assert main([*argv, "--seeds", "3", "--fused", "off", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--fused off" in out and "one after another" in out
