"""The training loop on real CIFAR-10 subsets: learning, exact resume after SIGKILL, NaN guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reslab.engine.config import TrainConfig
from reslab.engine.trainer import TrainingDiverged, train
from reslab.runtime.checkpoint import load_checkpoint


def _cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model="resnet20", data=str(root), out=str(out), device="cpu", precision="fp32",
        val_split=False, train_subset=64, eval_subset=64, eval_splits=["test"], batch_size=32,
        iters=40, eval_every=20, save_every=10, log_every=5, seed=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_overfits_a_small_batch(cifar_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(cifar_root, tmp_path / "run", pad=0, flip=False, iters=40, eval_every=10,
               train_subset=32, batch_size=32, lr=0.05, milestones=[], precision="auto")  # fmt: skip
    final = train(cfg, progress=False)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all('"test_error"' in r for r in rows)
    assert final["train_error"] < 10.0, final  # iterations 31-40 on the same 32 images
    for name in ("config.yaml", "last.pt", "final.json"):
        assert (tmp_path / "run" / name).is_file()
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["model_name"] == "resnet20" and ckpt["step"] == 40
    assert ckpt["preprocess"]["mode"] == "per_pixel" and len(ckpt["classes"]) == 10


def test_the_banner_says_how_bn_relu_runs(cifar_root: Path, tmp_path: Path, capsys) -> None:
    from reslab.models.bn_act import load_kernel

    train(_cfg(cifar_root, tmp_path / "on", iters=1, eval_every=1, precision="auto"))
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("  BN+ReLU "))
    ext = load_kernel()
    assert (f"fused kernel, {ext.simd()}, {ext.threads()} thread" if ext else "eager") in line
    from reslab.models.tiled_wgrad import status
    from reslab.runtime.precision import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    wgrad = next(ln for ln in err.splitlines() if ln.startswith("  conv wgrad "))
    assert wgrad.startswith(f"  conv wgrad {status(precision)}")
    # with both paths and the AMX kernels, identity blocks as one op (models/block_op.py)
    assert wgrad.endswith("as one op") == status(precision).startswith("AMX kernel")
    train(_cfg(cifar_root, tmp_path / "off", iters=1, eval_every=1, fused_bn_act=False,
               tiled_wgrad=False))  # fmt: skip
    err = capsys.readouterr().err
    assert "BN+ReLU" not in err and "conv wgrad" not in err  # the eager ops: nothing to say


def test_the_banner_warns_when_other_jobs_already_load_the_cpu() -> None:
    """Beside another job, 2 OpenMP threads on 2 cores ran many times slower than 1 thread,
    and nothing said so. Real busy processes, one per core, load the CPU here."""
    import os
    import subprocess
    import sys
    import time

    from reslab.engine.progress import busy_cpu_note

    cores = len(os.sched_getaffinity(0))
    cpu = torch.device("cpu")
    spin = "import time\nt = time.time()\nwhile time.time() - t < 5: pass"
    jobs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        time.sleep(0.5)  # the interpreters started and spinning
        note = busy_cpu_note(cpu, max(2, cores))
    finally:
        for j in jobs:
            j.kill()
            j.wait()
    assert note is not None and f"of its {cores} cores busy" in note and "--threads 1" in note
    assert busy_cpu_note(cpu, 1) is None  # one thread waits on nobody
    assert busy_cpu_note(torch.device("meta"), 2) is None  # not a CPU run


def test_the_banner_warns_when_bf16_is_only_emulated(
    cifar_root: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """--precision bf16 on a CPU without AVX512-BF16 or AMX (AMD Zen 3) trained ~12x slower than
    fp32 and nothing said why. The CPU's own answer first, then both answers set."""
    import reslab.runtime.precision as prec
    from reslab.engine.progress import emulated_bf16_note

    cpu = torch.device("cpu")
    assert (emulated_bf16_note(cpu, "bf16") is None) == prec.bf16_is_fast(cpu)
    assert emulated_bf16_note(cpu, "fp32") is None
    for fast in (False, True):
        monkeypatch.setattr(prec, "bf16_is_fast", lambda device, fast=fast: fast)
        train(_cfg(cifar_root, tmp_path / f"fast{fast}", iters=1, eval_every=1,
                   precision="bf16", train_subset=8, eval_subset=8, batch_size=8))  # fmt: skip
        notes = [ln for ln in capsys.readouterr().err.splitlines() if "no native bf16" in ln]
        assert len(notes) == (0 if fast else 1), notes
        assert fast or ("note" in notes[0] and "--precision auto" in notes[0])


def test_more_threads_than_cores_on_an_idle_cpu_is_not_called_busy(monkeypatch) -> None:
    """--threads 4 on 2 idle cores had always been warned about (the threshold went negative).
    The measurement is set here to an idle and a loaded machine."""
    import reslab.engine.progress as progress

    cpu = torch.device("cpu")
    monkeypatch.setattr(progress, "_busy_cores_of_others", lambda window: (2, 0.1))
    assert progress.busy_cpu_note(cpu, 4) is None
    monkeypatch.setattr(progress, "_busy_cores_of_others", lambda window: (2, 0.9))
    assert "keep 0.9 of its 2 cores busy" in progress.busy_cpu_note(cpu, 4)


def test_refuses_to_overwrite_a_run(cifar_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(cifar_root, tmp_path / "run", iters=2, eval_every=2, precision="auto")
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, progress=False)


def test_refuses_to_overwrite_files_no_run_wrote(cifar_root: Path, tmp_path: Path) -> None:
    """--out DIR where DIR/config.yaml is the user's own recipe (or DIR holds their own
    steps.jsonl): nothing is overwritten, nothing is written."""
    out = tmp_path / "proj"
    out.mkdir()
    mine = {"config.yaml": "description: mine\nlr: 0.05\n", "steps.jsonl": '{"my": "notes"}\n'}
    for name, text in mine.items():
        (out / name).write_text(text)
    cfg = _cfg(cifar_root, out, iters=2, eval_every=2)
    with pytest.raises(FileExistsError, match=r"config\.yaml, steps\.jsonl that no reslab run"):
        train(cfg, progress=False)
    assert {p.name: p.read_text() for p in out.iterdir() if p.name in mine} == mine
    assert sorted(p.name for p in out.iterdir()) == [".reslab.lock", "config.yaml", "steps.jsonl"]
    # A run killed before its first checkpoint (its own config.yaml, no last.pt) starts over.
    run = tmp_path / "killed"
    train(_cfg(cifar_root, run, iters=2, eval_every=2), progress=False)
    for name in ("last.pt", "final.json"):
        (run / name).unlink()
    train(_cfg(cifar_root, run, iters=2, eval_every=2), progress=False)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(
    cifar_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # lr 0.1 for 10 iterations (saved at 10), then x1e31 at the milestone: a resume may not
    # change the lr, so the jump is part of the one schedule.
    cfg = _cfg(cifar_root, out, iters=40, eval_every=100, save_every=10, milestones=[10],
               gamma=1e31)  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"last good state \(iteration 10\)"):
        train(cfg, progress=False)
    after = load_checkpoint(out / "last.pt")
    assert after["step"] == 10
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())


def _train_cmd(root: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "reslab", "train", "--model", "resnet20", "--data", str(root),
        "--out", str(out), "--device", "cpu", "--precision", "fp32", "--seed", "7",
        "--channels-last",
        "--iters", "36", "--save-every", "3", "--eval-every", "12",
        "--set", "train_subset=96", "--set", "eval_subset=32", "--set", "batch_size=16",
        "--set", "eval_splits=[test]", "--set", "val_split=false",
        "--set", "milestones=[20]", "--set", "log_every=3",
    ]  # fmt: skip


def test_resume_after_sigkill_is_bit_identical(
    cifar_root: Path, tmp_path: Path, kill_and_resume
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(cifar_root, ref), env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    cmd = lambda resume: _train_cmd(cifar_root, out) + (["--resume"] if resume else [])  # noqa: E731
    kills, resumes = kill_and_resume(cmd, watch=out / "last.pt", kills=3, env=env)
    assert kills == 3 and resumes == 3
    a = load_checkpoint(ref / "last.pt")["model"]
    b = load_checkpoint(out / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_rows = (ref / "metrics.jsonl").read_text().splitlines()
    got_rows = (out / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [r.split('"images_per_s"')[0] for r in rows]  # noqa: E731
    assert strip(got_rows) == strip(ref_rows)


def test_resnet110_style_warmup_returns_to_base_lr(cifar_root: Path, tmp_path: Path) -> None:
    """lr 0.01 until the training error (checked every 20 iterations) is below the threshold,
    then the main schedule from 0.1 — the real loop, not just the schedule function."""
    cfg = _cfg(cifar_root, tmp_path / "run", iters=40, eval_every=20, save_every=20,
               batch_size=16, warmup_lr=0.01, warmup_until_error=99.0, milestones=[],
               precision="auto")  # fmt: skip
    train(cfg, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [0.01, 0.1]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_state"]["warmup_ended_at"] == 20


@pytest.mark.parametrize("views", ["flip", "flip-shift"])
def test_eval_views_report_the_view_averaged_error(
    cifar_root: Path, tmp_path: Path, views: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reslab.engine.trainer as trainer_module
    from reslab.data.cifar import load_cifar
    from reslab.engine.eval_run import fast_eval_model, load_checkpoint_model
    from reslab.engine.evaluator import evaluate

    evaluated: list[int] = []  # BatchNorm layers left in each model the run evaluated

    def spy(net, *args, **kwargs):
        evaluated.append(sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in net.modules()))
        return evaluate(net, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    cfg = _cfg(cifar_root, tmp_path / "run", iters=10, eval_every=10, eval_views=views,
               alternate_flip=True, normalization="per_channel", schedule="linear",
               decay_bn=False, weight_decay=5e-4, small_size=24)  # fmt: skip
    final = train(cfg, progress=False)  # 5 iterations at 24x24, then 5 at 32x32
    groups = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 5e-4]  # BN and biases exempt
    m = load_checkpoint_model(tmp_path / "run" / "last.pt", device="cpu")
    test = load_cifar(cifar_root, split="test")
    x, y = m.preprocess.normalize(test.images[:64]), test.labels[:64]
    # The run evaluates the model `reslab eval` builds from its checkpoint (BatchNorm folded,
    # channels_last): the same scores, so the same error to the last digit.
    net = fast_eval_model(m.model, torch.device("cpu"))
    averaged = evaluate(net, [(x, y)], device="cpu", views=views)
    assert final["test_error"] == averaged.top1_error
    assert evaluated and all(n == 0 for n in evaluated)  # the run's evaluations: no BatchNorm
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.model.modules())


def test_a_model_that_cannot_be_copied_is_evaluated_unfolded(
    cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Evaluations run on a folded copy; a model the Python API gave something uncopyable (here a
    lock) is evaluated as it is, with one line said, and the run finishes with its files."""
    import threading

    from reslab.engine.rundir import release_lock
    from reslab.engine.trainer import Trainer

    cfg = _cfg(cifar_root, tmp_path / "run", iters=4, eval_every=2, save_every=2)
    trainer = Trainer(cfg, progress=False)
    trainer.model.layer1.lock = threading.Lock()  # deepcopy: "cannot pickle '_thread.lock'"
    try:
        final = trainer.fit()
    finally:
        release_lock(tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and final["iter"] == 4 and (tmp_path / "run" / "last.pt").is_file()
    err = capsys.readouterr().err
    assert err.count("evaluating the model unfolded") == 1 and "TypeError" in err


def test_time_limit_counts_this_call_only(
    cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--time-limit is each call's budget: a run it stopped, resumed with time to spare, runs to
    the end (it compared the seconds of all calls before, so every resume trained one
    iteration), and the stopped call says how to continue."""
    from reslab.cli import main
    from reslab.runtime.checkpoint import save_atomic

    out = tmp_path / "run"
    argv = ["train", "--model", "resnet20", "--data", str(cifar_root), "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--iters", "6", "--eval-every", "100",
            "--set", "train_subset=64", "--set", "eval_subset=32", "--set", "batch_size=16",
            "--set", "eval_splits=[test]", "--set", "val_split=false"]  # fmt: skip
    assert main([*argv, "--time-limit", "1e-9"]) == 0  # stops after its first iteration
    said = capsys.readouterr().out
    assert "done: 1 iterations" in said
    stopped = f"stopped by the time limit (1e-09 s) at iteration 1 of 6; `reslab train --out {out}"
    assert f"{stopped} --resume` continues it" in said
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["train_state"]["wall"] = 1e6  # as if the calls before had trained for days
    save_atomic(ckpt, out / "last.pt")
    assert main(["train", "--out", str(out), "--resume", "--time-limit", "600"]) == 0
    said = capsys.readouterr().out
    assert "done: 6 iterations" in said and "stopped by" not in said
    assert json.loads((out / "final.json").read_text())["iter"] == 6


def test_train_leaves_the_callers_config_as_it_was(cifar_root: Path, tmp_path: Path) -> None:
    """What a run works out (iterations and milestones from epochs, the normalisation) goes into
    its own copy and RUN_DIR/config.yaml: written back into the caller's object, a config reused
    for a second run had trained with the first run's values (helper audit C, S3)."""
    import dataclasses

    import yaml

    cfg = _cfg(cifar_root, tmp_path / "a", epochs=1.0, milestones=[20, 30], eval_every=1000,
               save_every=1000)  # fmt: skip
    before = dataclasses.asdict(cfg)
    train(cfg, progress=False)
    assert dataclasses.asdict(cfg) == before
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["iters"] == 2 and saved["epochs"] == 1.0  # 64 images / batch 32
    cfg.out = str(tmp_path / "b")  # the same object, run again: the same resolution, afresh
    train(cfg, progress=False)
    again = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k not in ("out", "_run")} == {
        k: v for k, v in saved.items() if k not in ("out", "_run")
    }


def test_cpu_training_sets_glibc_malloc_for_tensors(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU run sets glibc's thresholds (reslab.runtime.memory) before its data loads and its
    loader workers fork: at 224px a step's activations were page-faulted in afresh (x1.12-1.32)."""
    from reslab.engine import trainer as trainer_module
    from reslab.engine.rundir import release_lock

    calls: list[str] = []

    def build_data(*args, **kwargs):
        calls.append("data")
        raise KeyboardInterrupt  # (stops the constructor here)

    monkeypatch.setattr(trainer_module, "tune_malloc", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(trainer_module, "build_data", build_data)
    with pytest.raises(KeyboardInterrupt):
        trainer_module.Trainer(_cfg(cifar_root, tmp_path / "run", iters=1), progress=False)
    release_lock(tmp_path / "run")
    assert calls == ["tuned", "data"]
