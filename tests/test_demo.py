"""`reslab demo` on folders that already hold something, and without its data: refused or
resumed before any speed measurement or training."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from reslab.cli import main
from reslab.demo import _earlier_demo
from reslab.engine.config import load_recipe, save_config
from reslab.errors import UserError


def test_missing_data_is_named_before_the_speed_is_measured(tmp_path: Path, capsys) -> None:
    t = time.perf_counter()
    rc = main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "cifar10 not found" in err and "Traceback" not in err
    assert time.perf_counter() - t < 5  # was several seconds of measured steps first
    assert not (tmp_path / "d").exists()


def test_another_run_in_out_is_refused_in_the_demos_terms(tmp_path: Path) -> None:
    """An existing train run as --out: the refusal had been train's --resume message about
    warmup_iters and batch sizes the user never set."""
    other = tmp_path / "base"
    other.mkdir()
    save_config(load_recipe("cifar10-paper"), other / "config.yaml", {})
    (other / "last.pt").write_bytes(b"never read")
    cfg = replace(load_recipe("cifar10-fast"), out=str(other))
    with pytest.raises(UserError, match=r"holds another run, not a demo .*reslab train --out"):
        _earlier_demo(cfg)


def test_an_interrupted_demo_resumes_on_its_own_plan(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    d.mkdir()
    planned = replace(load_recipe("cifar10-fast"), out=str(d), data="/elsewhere", iters=37,
                      eval_every=10, save_every=10, warmup_iters=3, time_limit=90.0)  # fmt: skip
    save_config(planned, d / "config.yaml", {"git": "x"})
    (d / "last.pt").write_bytes(b"never read here")
    today = replace(load_recipe("cifar10-fast"), out=str(d), data="/here")
    stored = _earlier_demo(today)
    assert stored is not None and (stored["iters"], stored["warmup_iters"]) == (37, 3)
    assert _earlier_demo(replace(today, out=str(tmp_path / "fresh"))) is None


def test_a_demo_stopped_before_its_first_checkpoint_starts_again(tmp_path: Path) -> None:
    """Its config.yaml alone is no run to resume (resuming it had been refused)."""
    d = tmp_path / "demo"
    d.mkdir()
    save_config(replace(load_recipe("cifar10-fast"), out=str(d), iters=37), d / "config.yaml", {})
    assert _earlier_demo(replace(load_recipe("cifar10-fast"), out=str(d))) is None


@pytest.mark.parametrize("content", ["{}\n", "lr: 0.2\n", "- a list\n"])
def test_a_checkpoint_beside_a_foreign_config_is_refused_not_a_traceback(
    tmp_path: Path, content: str
) -> None:
    d = tmp_path / "u"
    d.mkdir()
    (d / "config.yaml").write_text(content)
    (d / "last.pt").write_bytes(b"never read")
    with pytest.raises(UserError, match="holds another run, not a demo"):
        _earlier_demo(replace(load_recipe("cifar10-fast"), out=str(d)))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(UserError, match="is a file; give the demo a folder"):
        _earlier_demo(replace(load_recipe("cifar10-fast"), out=str(afile)))


def test_a_finished_demo_is_reported_not_trained_again(tmp_path: Path) -> None:
    """Run again on a finished demo, it had resumed: one more evaluation and another entry in
    its config.yaml each time."""
    import json

    from reslab.demo import _finished

    d = tmp_path / "demo"
    d.mkdir()
    cfg = replace(load_recipe("cifar10-fast"), out=str(d), iters=37)
    row = {"iter": 37, "epoch": 0.2, "wall_time": 12.5, "test_error": 61.0}
    (d / "final.json").write_text(json.dumps(row))
    assert _finished(cfg) == row
    (d / "final.json").write_text(json.dumps({**row, "iter": 20}))  # stopped by its time limit
    assert _finished(cfg) is None
    (d / "final.json").write_text("{damaged")
    assert _finished(cfg) is None


def test_download_is_tried_before_the_speed_is_measured(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Offline, `reslab demo --download` (what `make demo` runs without $RESLAB_DATA) had
    measured the speed for a minute before the download failed."""
    import reslab.data.cifar as cifar
    import reslab.demo as demo
    from reslab.data.cifar import DataError

    def offline(root, *, dataset="cifar10"):
        raise DataError(f"could not download {dataset} (offline)")

    def never(*a, **k):
        raise AssertionError("speed measured before the download")

    monkeypatch.setattr(cifar, "download_cifar", offline)
    monkeypatch.setattr(demo, "seconds_per_step", never)
    rc = main(["demo", "--download", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "could not download cifar10" in capsys.readouterr().err


def test_the_speed_is_measured_on_the_trainers_cpu_paths(monkeypatch) -> None:
    """The plan had timed the eager step while training ran reslab's CPU kernels (2x on
    Intel AMX), so a demo asked for 4 minutes trained about 2."""
    import reslab.models.cpu_paths as cpu_paths
    from reslab.demo import seconds_per_step

    seen = []
    monkeypatch.setattr(cpu_paths, "use_cpu_training_paths",
                        lambda model, **kw: seen.append(kw) or (None, None))  # fmt: skip
    cfg = replace(load_recipe("cifar10-fast"), device="cpu", precision="fp32", batch_size=4)
    assert seconds_per_step(cfg, steps=3) > 0
    assert len(seen) == 1 and seen[0]["precision"] == "fp32"
    assert seconds_per_step(replace(cfg, fused_bn_act=False, tiled_wgrad=False), steps=3) > 0
    assert seen[1]["fused_bn_act"] is False and seen[1]["tiled_wgrad"] is False


@pytest.mark.parametrize("iters", [20, 37, 136, 137, 259, 655, 6001])
def test_the_last_planned_evaluation_is_the_final_one(iters: int) -> None:
    """iters // 4 evaluated at 652 and again at 655 (the final evaluation) in a 655-iteration
    demo: a second pass over the test set and a row trained on 3 batches."""
    from reslab.demo import plan_every

    every = plan_every(iters)
    periodic = list(range(every, iters + 1, every))
    evals = sorted(set(periodic) | {iters})
    assert len(evals) <= 5
    assert min(b - a for a, b in zip([0, *evals], evals)) >= min(every, iters) // 2
