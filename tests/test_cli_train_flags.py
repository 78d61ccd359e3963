"""train's everyday flags, recipe listing and zoo check; milestones that follow the run length."""

from __future__ import annotations

import pytest
import torch

from reslab.cli import _empty_flag, _train_config, build_parser, main
from reslab.engine.config import TrainConfig
from reslab.engine.progress import banner


def _cfg(argv: list[str]):
    args = build_parser().parse_args(["train", *argv])
    return _train_config(args)


def test_flags_set_the_config_and_iters_scale_paper_milestones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _cfg(["--recipe", "cifar10-paper", "--iters", "1000", "--lr", "0.05",
                "--batch-size", "64", "--workers", "3"])  # fmt: skip
    assert (cfg.lr, cfg.batch_size, cfg.workers, cfg.iters) == (0.05, 64, 3, 1000)
    # 32k and 48k of 64k iterations: the lr still drops at 1/2 and 3/4 of the run.
    assert cfg.milestones == [500, 750]
    assert "milestones scaled" in capsys.readouterr().err
    assert _cfg(["--recipe", "cifar10-paper"]).milestones == [32000, 48000]
    # A toy length keeps two distinct drops (rounded alone, both were 2: lr /100 in one step).
    assert _cfg(["--recipe", "cifar10-paper", "--iters", "3"]).milestones == [2, 3]
    assert "1 at or after the end" in capsys.readouterr().err
    assert _cfg(["--recipe", "imagenet-paper", "--iters", "2"]).milestones == [1, 2]
    # Milestones the user gives are theirs: --iters does not move them.
    own = _cfg(["--recipe", "cifar10-paper", "--iters", "36", "--set", "milestones=[20]"])
    assert (own.iters, own.milestones) == (36, [20])
    # A recipe in epochs gives way to an explicit --iters.
    ft = _cfg(["--recipe", "finetune", "--iters", "7"])
    assert (ft.iters, ft.epochs) == (7, None)


def test_train_help_lists_recipes_and_unknown_model_lists_zoo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("finetune", "cifar10-paper", "imagenet-paper", "--lr", "--batch-size",
                 "--threads", "--workers"):  # fmt: skip
        assert name in out
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "resnet19"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet19'" in err and "resnet20, resnet32" in err
    assert "Traceback" not in err


def test_a_malformed_set_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--set", "lr"]) == 2
    err = capsys.readouterr().err
    assert err == "reslab train: error: --set lr: expects key=value, e.g. --set lr=0.05\n"


def test_compile_flags_decide_over_the_recipe_and_the_banner_says_so() -> None:
    assert _cfg(["--recipe", "cifar10-fast"]).compile is False  # off unless asked (see config)
    assert _cfg(["--recipe", "cifar10-fast", "--set", "compile=true"]).compile is True
    off = _cfg(["--recipe", "cifar10-fast", "--set", "compile=true", "--no-compile"])
    assert off.compile is False  # an explicit flag wins over the recipe and --set
    for flag in (["--compile"], ["--compile-mode", "max-autotune"]):
        assert _cfg(["--recipe", "cifar10-fast", *flag]).compile is True
    shown = {}
    for on in (True, False):
        cfg = TrainConfig(compile=on)
        shown[on] = banner(cfg, recipe_note="r", train_size=50000, classes=10, evals={},
                           device=torch.device("cpu"), precision="bf16", world_size=1,
                           notes=[])  # fmt: skip
    assert "torch.compile" in shown[True] and "torch.compile" not in shown[False]


def test_banner_names_progressive_resizing_and_warmups_only_when_on() -> None:
    def shown(cfg: TrainConfig) -> str:
        return banner(cfg, recipe_note="r", train_size=50000, classes=10, evals={},
                      device=torch.device("cpu"), precision="bf16", world_size=1,
                      notes=[])  # fmt: skip

    on = _cfg(["--recipe", "cifar10-progressive"])
    assert "first 80% at 24x24 (small_size)" in shown(on)
    assert "small_size" not in shown(_cfg(["--recipe", "cifar10-fast"]))
    # ... and the warm-ups: ResNet-110's lr 0.01 phase (section 4.2), cifar10-fast's linear ramp
    assert "lr 0.01 until training error < 80%" in shown(_cfg(["--recipe", "cifar10-paper-110"]))
    fast = _cfg(["--recipe", "cifar10-fast"])
    assert f"linear warm-up {fast.warmup_iters:,} iterations" in shown(fast)
    assert "warm-up" not in shown(_cfg(["--recipe", "cifar10-paper"]))


def test_a_closed_pipe_ends_quietly() -> None:
    """`reslab models | head -1`: no BrokenPipeError traceback, the exit status of SIGPIPE."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "reslab", "models"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)  # fmt: skip
    assert p.stdout is not None
    p.stdout.close()  # the reader is gone before the table is printed
    err = p.stderr.read().decode() if p.stderr else ""
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "x.png", "--checkpoint", "c.pt", "--topk", "0"],
        ["predict", "x.png", "--checkpoint", "c.pt", "--batch-size", "0"],
        ["eval", "--checkpoint", "c.pt", "--limit", "-5"],
        ["eval", "--checkpoint", "c.pt", "--views", "multi-scale", "--scales", "0"],
        ["data", "stats", "d", "--resize", "0"],
        ["train", "--seed", "-1"],
        ["train", "--seed", "999999999999999999999999"],
        ["train", "--threads", "100000"],
        ["demo", "--minutes", "nan"],
        ["demo", "--minutes", "-1"],
        ["eval", "--checkpoint", "c.pt", "--views", "multi-scale", "--scales", "100000"],
        ["train", "--iters", "5", "--epochs", "nan"],  # checked although --iters wins
        ["train", "--iters", "5", "--epochs", "-1"],
        ["train", "--epochs", "1e30"],
        ["train", "--nproc", "0"],
    ],
)
def test_numbers_no_command_can_use_are_refused_by_the_parser(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[-2]}" in err and "Traceback" not in err


def test_a_seed_out_of_range_in_set_is_refused(capsys) -> None:
    assert main(["train", "--set", "seed=-1", "--iters", "1"]) == 2
    assert "seed must be a whole number >= 0, got -1" in capsys.readouterr().err


def test_max_pixels_on_a_cifar_run_is_refused_as_doing_nothing(capsys, tmp_path) -> None:
    """CIFAR images are arrays, never decoded from files: the limit would be silently ignored."""
    assert (
        main(["train", "--max-pixels", "1000", "--iters", "1", "--out", str(tmp_path / "r")]) == 2
    )
    err = capsys.readouterr().err
    assert "--max-pixels limits the images read from an image folder; cifar10" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    cfg = _cfg(["--dataset", "folder", "--data", str(tmp_path), "--max-pixels", "1000"])
    assert cfg.max_pixels == 1000


def test_a_recipes_warm_up_shrinks_with_a_short_iters_run(capsys, tmp_path) -> None:
    """cifar10-fast warms up for 200 iterations: a 20-iteration run never reached its lr. With
    --iters the warm-up is capped at a tenth of the run (as the demo plans it), said in a note;
    a warm-up given with --set is the user's; a run in epochs is warned about, not changed."""
    from reslab.engine.run_length import iters_from_epochs

    assert _cfg(["--recipe", "cifar10-fast"]).warmup_iters == 200
    cfg = _cfg(["--recipe", "cifar10-fast", "--iters", "20"])
    assert (cfg.iters, cfg.warmup_iters) == (20, 2)
    assert (
        "linear lr warm-up shortened with the run: 200 -> 2 iterations" in capsys.readouterr().err
    )
    assert _cfg(["--recipe", "cifar10-fast", "--iters", "5000"]).warmup_iters == 200
    own = _cfg(["--recipe", "cifar10-fast", "--iters", "20", "--set", "warmup_iters=15"])
    assert own.warmup_iters == 15
    # The same command with --resume (or a longer --iters) continues the run as it was stored:
    # the recipe's 200 would be "another configuration" (found by review).
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg(["--recipe", "cifar10-fast", "--iters", "20", "--out", str(out)])
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for iters in ("20", "40"):
        res = _cfg(["--recipe", "cifar10-fast", "--iters", iters, "--out", str(out), "--resume"])
        assert (res.iters, res.warmup_iters) == (int(iters), 2)
    ep = TrainConfig(epochs=1, batch_size=256, warmup_iters=200, schedule="cosine")
    note = iters_from_epochs(ep, train_size=50_000)
    assert ep.iters == 195 and ep.warmup_iters == 200
    assert note is not None and "takes more than half of this 195-iteration run" in note


def test_max_restarts_without_nproc_is_refused_not_ignored(capsys, tmp_path) -> None:
    assert main(["train", "--max-restarts", "2", "--iters", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--max-restarts works with --nproc N" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv,line",
    [
        (["eval", "--checkpoint", "c.pt", "--model", "resnet56"], "--model goes with --weights"),
        (["eval", "--checkpoint", "c.pt", "--scales", "40"], "--scales goes with --views multi"),
        (["train", "--lr", "nan", "--iters", "1"], "reslab train: error: lr must be a number"),
    ],
)
def test_flags_that_would_be_ignored_are_refused_in_one_line(argv, line, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert line in err[-1] and "Traceback" not in "".join(err), err
    assert err[-1].count("reslab ") == 1  # the command named once, not "reslab x: reslab x:"


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["train", "--out", ""], "--out"),  # had meant the current directory, silently
        (["train", "--data=", "--iters", "1"], "--data"),  # had meant $RESLAB_DATA
        (["eval", "--checkpoint", "c.pt", "--out", ""], "--out"),
        (["predict", "x.png", "--model", "resnet20", "--weights", "w", "--csv", ""], "--csv"),
        (["export", "--checkpoint", "", "--out", "m.onnx"], "--checkpoint"),
    ],
)
def test_an_empty_flag_value_is_refused_before_anything_runs(
    argv, flag, capsys, tmp_path, monkeypatch
) -> None:
    """`--out $RUN` with RUN unset: one line naming the flag, and nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"reslab {argv[0]}: error: {flag} is given an empty value (an unset shell "
                   "variable?); give it one or drop the flag"]  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    # A flag that takes no value before an empty positional is not blamed.
    argv = ["predict", "--json", "", "--model", "resnet20", "--weights", "w"]
    assert _empty_flag(argv, build_parser().parse_args(argv)) is None
