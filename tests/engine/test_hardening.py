"""`reslab train` under bad input: each case one line naming the file or flag, exit code 2, no
traceback, nothing on disk changed and no code from a file run (issue 13's campaign)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from reslab.cli import main
from reslab.models import create_model
from reslab.runtime.checkpoint import load_checkpoint, save_atomic


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "resnet20", "--data", str(root), "--out", str(out), "--device",
        "cpu", "--precision", "fp32", "--iters", "2", "--eval-every", "2", "--no-channels-last",
        "--set", "train_subset=64", "--set", "eval_subset=32", "--set", "batch_size=32",
        "--set", "eval_splits=[test]", "--set", "val_split=false", *extra,
    ]  # fmt: skip


def fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    """Run the CLI in-process; expect exit 2 and exactly one error line holding `needles`."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal of a flag's value: exit 2, usage + one line
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and len(lines) == 1, (rc, err[-2000:])
    for n in needles:
        assert n in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]
    return lines[0]


def digest(run: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def finished_run(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(train_args(cifar_root, out)) == 0
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


class Evil:
    """Unpickling this creates a marker file: the code a crafted file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cifar_copy(root: Path, dst: Path, *, drop: str | None = None) -> Path:
    """A CIFAR-10 directory of symlinks to the real batches (minus `drop`)."""
    src, d = root / "cifar-10-batches-py", dst / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != drop:
            (d / f.name).symlink_to(f)
    return d


# --- the config and the command line --------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--set", "batch_size=0"], "batch_size must be a whole number >= 1, got 0"),
        (["--iters", "-5"], "--iters: must be a whole number >= 1, got '-5'"),
        (["--set", "eval_every=ten"], "eval_every expects a whole number, got 'ten'"),
        (["--set", "no_such_field=1"], "unknown config field 'no_such_field'"),
        (["--set", "lr=fast"], "lr expects a number"),
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--recipe", "no-such-recipe"], "no recipe 'no-such-recipe'"),
    ],
)
def test_bad_flags_one_line(
    cifar_root: Path, tmp_path: Path, capsys, extra: list[str], needle: str
) -> None:
    fails_cleanly(train_args(cifar_root, tmp_path / "run", *extra), capsys, needle)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_set_parses_numbers_as_the_fields_type() -> None:
    from reslab.engine.config import TrainConfig

    cfg = TrainConfig().override(["lr=1e-3", "iters=1e4", "time_limit=60", "out=2024"])
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float)  # YAML alone gives the string '1e-3'
    assert cfg.iters == 10000 and isinstance(cfg.iters, int)
    assert cfg.time_limit == 60.0 and cfg.out == "2024"


def test_data_and_out_pointing_at_files(cifar_root: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "a_file"
    f.write_text("x")
    fails_cleanly(train_args(f, tmp_path / "run"), capsys, f"--data {f} is a file")
    fails_cleanly(train_args(cifar_root, f), capsys, f"--out {f}", "is a file")
    assert f.read_text() == "x"


def test_training_set_smaller_than_a_batch_is_refused(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    argv = train_args(cifar_root, tmp_path / "run", "--set", "train_subset=6", "--set",
                      "batch_size=8")  # fmt: skip
    fails_cleanly(argv, capsys, "has 6 images but one batch needs 8")
    assert not (tmp_path / "run").exists()  # the refused run leaves no directory it made
    (tmp_path / "mine").mkdir()  # ... and a directory the user made stays, with its lock file
    fails_cleanly([*argv[:6], str(tmp_path / "mine"), *argv[7:]], capsys, "one batch needs 8")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [".reslab.lock"]


def test_nan_before_any_checkpoint_is_worded_truthfully(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    argv = train_args(cifar_root, tmp_path / "run", "--set", "lr=1e30", "--set", "log_every=1",
                      "--iters", "20", "--eval-every", "20")  # fmt: skip
    line = fails_cleanly(argv, capsys, "no checkpoint was written yet")
    assert "still holds" not in line and "--precision fp32" not in line  # fp32 is in use
    assert not (tmp_path / "run" / "last.pt").exists()


# --- CIFAR files ---------------------------------------------------------------------------


def test_cifar_batch_with_code_never_runs(cifar_root: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    d = cifar_copy(cifar_root, tmp_path / "data", drop="test_batch")
    with (d / "test_batch").open("wb") as f:
        pickle.dump({"data": Evil(marker), "labels": [0]}, f)
    fails_cleanly(train_args(tmp_path / "data", tmp_path / "run"), capsys,
                  str(d / "test_batch"), "posix.system is not allowed")  # fmt: skip
    assert main(["data", "check", str(tmp_path / "data")]) != 0
    assert not marker.exists()


def test_cifar_object_arrays_are_refused(tmp_path: Path) -> None:
    from reslab.data.cifar import UnsafeDataError, _unpickle

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": np.array([object()], dtype=object), "labels": [0]}))
    with pytest.raises(UnsafeDataError, match="object dtype"):
        _unpickle(path)


def test_cifar_missing_and_truncated_batches_named(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    cifar_copy(cifar_root, tmp_path / "a", drop="data_batch_3")
    fails_cleanly(train_args(tmp_path / "a", tmp_path / "run"), capsys, "data_batch_3 is missing")
    d = cifar_copy(cifar_root, tmp_path / "b", drop="data_batch_2")
    raw = (cifar_root / "cifar-10-batches-py" / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(raw[: len(raw) // 3])
    fails_cleanly(train_args(tmp_path / "b", tmp_path / "run"), capsys, str(d / "data_batch_2"))


# --- resuming ------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["empty", "random"])
def test_damaged_last_pt(cifar_root: Path, run_copy: Path, capsys, content: str) -> None:
    data = b"" if content == "empty" else np.random.default_rng(0).bytes(4096)
    (run_copy / "last.pt").write_bytes(data)
    before = digest(run_copy)
    fails_cleanly(train_args(cifar_root, run_copy, "--resume"), capsys,
                  str(run_copy / "last.pt"))  # fmt: skip
    assert digest(run_copy) == before


def test_resume_into_a_folder_without_a_run_refuses(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    """A mistyped --out with --resume had started a new run of the defaults (64k iterations of
    cifar10-paper without train_args' overrides) under the banner "recipe the run's config.yaml"."""
    missing = tmp_path / "typo"
    fails_cleanly(["train", "--out", str(missing), "--resume", "--data", str(cifar_root)], capsys,
                  "--resume:", "does not exist: nothing to resume")  # fmt: skip
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_cleanly(train_args(cifar_root, empty, "--resume"), capsys, "holds no run")
    assert list(empty.iterdir()) == []


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(
    cifar_root: Path, tmp_path: Path
) -> None:
    """Its config.yaml is there, no last.pt: --resume starts it again on that config."""
    out = tmp_path / "early"
    assert main(train_args(cifar_root, out)) == 0
    for name in ("last.pt", "final.json", "metrics.jsonl"):
        (out / name).unlink()
    assert main(train_args(cifar_root, out, "--resume")) == 0
    assert (out / "last.pt").exists()


def test_resume_without_last_pt_refuses(cifar_root: Path, run_copy: Path, capsys) -> None:
    (run_copy / "last.pt").unlink()
    before = digest(run_copy)
    fails_cleanly(train_args(cifar_root, run_copy, "--resume"), capsys, "no last.pt to resume")
    assert digest(run_copy) == before  # metrics, best/final and config kept


def test_resume_with_another_model_or_recipe_refuses(
    cifar_root: Path, run_copy: Path, capsys
) -> None:
    before = digest(run_copy)
    argv = train_args(cifar_root, run_copy, "--resume", "--iters", "4")
    argv[argv.index("resnet20")] = "resnet32"
    fails_cleanly(argv, capsys, "model: 'resnet20' -> 'resnet32'")
    other = [*train_args(cifar_root, run_copy, "--resume"), "--set", "normalization=per_channel"]
    fails_cleanly(other, capsys, "normalization: 'per_pixel' -> 'per_channel'")
    assert digest(run_copy) == before


def test_checkpoint_from_another_version_refuses(cifar_root: Path, run_copy: Path, capsys) -> None:
    ckpt = load_checkpoint(run_copy / "last.pt")
    save_atomic({**ckpt, "version": 99}, run_copy / "last.pt")
    fails_cleanly(train_args(cifar_root, run_copy, "--resume"), capsys, "format version 99")
    argv = ["eval", "--checkpoint", str(run_copy / "last.pt"), "--data", str(cifar_root)]
    fails_cleanly([*argv, "--limit", "8"], capsys, "format version 99")


def test_resume_may_extend_iters_and_keeps_provenance(
    cifar_root: Path, run_copy: Path, capsys
) -> None:
    import yaml

    assert main(train_args(cifar_root, run_copy, "--resume", "--iters", "4")) == 0
    assert load_checkpoint(run_copy / "last.pt")["step"] == 4
    doc = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert doc["iters"] == 4 and len(doc["_earlier_runs"]) == 1 and "git" in doc["_run"]


def test_stale_temp_files_are_cleaned(cifar_root: Path, run_copy: Path) -> None:
    stale = run_copy / ".last.pt.k9x2.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(train_args(cifar_root, run_copy, "--resume", "--iters", "4")) == 0
    assert not stale.exists()


def test_second_writer_refused_and_lock_dies_with_its_process(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         f"fd = os.open({str(out / '.reslab.lock')!r}, os.O_RDWR | os.O_CREAT); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        fails_cleanly(train_args(cifar_root, out), capsys, "in use by another reslab run")
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    assert main(train_args(cifar_root, out)) == 0


def test_a_batch_that_does_not_divide_among_the_processes_is_one_line(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    """Refused by the launcher before torchrun starts (no rank tracebacks, nothing written)."""
    out = tmp_path / "r"
    fails_cleanly(train_args(cifar_root, out, "--nproc", "3"), capsys,
                  "batch_size 32 does not divide among 3 processes", "--batch-size 30 or 33")  # fmt: skip
    fails_cleanly(train_args(cifar_root, out, "--nproc", "2", "--batch-size", "33"), capsys,
                  "batch_size 33 does not divide among 2 processes")  # fmt: skip
    assert not out.exists()


def test_a_missing_data_directory_is_named_as_such(tmp_path: Path, capsys) -> None:
    """Not "cifar10 not found" for a folder the user meant to fine-tune on, and no notice that
    a directory that is not there is an image folder."""
    gone = tmp_path / "nope"
    fails_cleanly(["train", "--data", str(gone), "--out", str(tmp_path / "r")], capsys,
                  f"--data {gone} does not exist", f"reslab data download {gone}",
                  "or an image folder")  # fmt: skip
    fails_cleanly(["train", "--data", str(gone), "--dataset", "folder", "--out",
                   str(tmp_path / "r")], capsys, "does not exist; give a folder with one")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_the_lock_dies_with_the_trainer_not_with_its_forked_workers(tmp_path: Path) -> None:
    """A SIGKILLed trainer's DataLoader workers live on for seconds; the directory must be free
    the moment the trainer itself is gone (a torchrun restart comes at once)."""
    import signal
    import subprocess
    import sys

    from reslab.engine import rundir

    out = tmp_path / "run"
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from reslab.engine import rundir\n"
        f"rundir.acquire_lock(Path({str(out)!r}))\n"
        "if os.fork() == 0:\n"  # a worker: inherits every descriptor, outlives its parent
        "    time.sleep(60); os._exit(0)\n"
        "print(os.getpid(), flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert int(proc.stdout.readline()) == proc.pid
        with pytest.raises(
            rundir.RunDirError, match=f"in use by another reslab run \\(pid {proc.pid}"
        ):
            rundir.acquire_lock(out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rundir.acquire_lock(out)  # the forked child still runs, holding the descriptor
    finally:
        proc.kill()
        rundir.release_lock(out)
        subprocess.run(["pkill", "-f", f"acquire_lock\\(Path\\({str(out)!r}"], check=False)


def test_best_pt_survives_a_kill_between_the_two_writes(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reslab.engine.config import TrainConfig
    from reslab.engine.trainer import Trainer, train

    cfg = dict(model="resnet20", data=str(cifar_root), out=str(tmp_path / "run"), device="cpu",
               precision="fp32", train_subset=64, eval_subset=32, batch_size=32, iters=4,
               eval_every=2, save_every=2, log_every=1, eval_splits=["val"],
               channels_last=False)  # fmt: skip

    class Killed(BaseException):
        pass

    def die(self) -> None:  # the process dies right after last.pt is renamed into place
        raise Killed

    monkeypatch.setattr(Trainer, "_save_best", die)
    with pytest.raises(Killed):
        train(TrainConfig(**cfg), progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert not (run / "best.pt").exists()
    assert load_checkpoint(run / "last.pt")["train_state"]["best_step"] == 2
    train(TrainConfig(**{**cfg, "iters": 2}), resume=True, progress=False)
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == 2
    assert (run / "best.pt").read_bytes() == (run / "last.pt").read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_during_save(cifar_root: Path, tmp_path: Path, capsys) -> None:
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    # ResNet-20's checkpoint is ~2.2 MB: one fits in 3 MB, a second (temporary) copy does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        argv = train_args(cifar_root, out, "--iters", "4", "--save-every", "2", "--eval-every",
                          "100")  # fmt: skip
        fails_cleanly(argv, capsys, "no space left on device", str(out / "last.pt"),
                      "previous version is unchanged")  # fmt: skip
        assert load_checkpoint(out / "last.pt")["step"] == 2
        assert not list(out.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- weights files -------------------------------------------------------------------------


def _reslab_safetensors(path: Path, options: dict) -> Path:
    sd = {k: v.contiguous() for k, v in create_model("resnet20").state_dict().items()}
    meta = {"format": "reslab", "model_name": "resnet20", "model_options": json.dumps(options),
            "preprocess": "null", "classes": "null"}  # fmt: skip
    save_file(sd, str(path), metadata=meta)
    return path


def _huge_header(path: Path) -> Path:
    head = json.dumps({"w": {"dtype": "F32", "shape": [10**9, 1000],
                             "data_offsets": [0, 4 * 10**12]}}).encode()  # fmt: skip
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 64)
    return path


@pytest.mark.parametrize("case", ["huge_header", "num_classes_1e9", "unknown_option"])
def test_bad_weights_files(cifar_root: Path, tmp_path: Path, capsys, case: str) -> None:
    if case == "huge_header":
        f, needle = _huge_header(tmp_path / "w.safetensors"), "cannot be read"
    elif case == "num_classes_1e9":
        f = _reslab_safetensors(tmp_path / "w.safetensors", {"num_classes": 10**9})
        needle = "num_classes must be a whole number in 1..100000"
    else:
        f = _reslab_safetensors(tmp_path / "w.safetensors", {"bogus": 1})
        needle = "model_options.bogus: no model takes this option"
    out = tmp_path / "m.onnx"
    fails_cleanly(["export", "--weights", str(f), "--format", "onnx", "--out", str(out)], capsys,
                  needle)  # fmt: skip
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    fails_cleanly(["predict", str(img), "--weights", str(f), "--normalize", "cifar10"], capsys,
                  needle)  # fmt: skip
    # Refused by train too, though it re-sizes the head to the data set's 10 classes: a class
    # count no model can have is a damaged file.
    fails_cleanly(train_args(cifar_root, tmp_path / "run", "--weights", str(f)), capsys, needle)
    assert not out.exists()


def test_random_bytes_weights_never_suggest_unsafe_loading(tmp_path: Path, capsys) -> None:
    f = tmp_path / "w.pt"
    f.write_bytes(np.random.default_rng(1).bytes(5000))
    line = fails_cleanly(["export", "--weights", str(f), "--format", "onnx", "--out",
                          str(tmp_path / "m.onnx")], capsys, str(f))  # fmt: skip
    assert "trust" not in line
    torch.save({"format": "reslab", "version": 1, "x": Evil(tmp_path / "PWNED")}, tmp_path / "e.pt")
    fails_cleanly(["export", "--checkpoint", str(tmp_path / "e.pt"), "--format", "onnx",
                   "--out", str(tmp_path / "m.onnx")], capsys, "posix.system")  # fmt: skip
    assert not (tmp_path / "PWNED").exists()


def test_resume_config_compares_only_fields_both_know() -> None:
    from reslab.engine.rundir import config_differences

    # A field added to TrainConfig after the checkpoint was written must not block its resume.
    assert (
        config_differences({"model": "a", "iters": 1}, {"model": "a", "iters": 5, "new": 1}) == []
    )
    assert config_differences({"model": "a", "lr": 0.1}, {"model": "b", "lr": 0.1}) == [
        "model: 'a' -> 'b'"
    ]


def test_resume_with_the_recipe_named_may_extend_iters(cifar_root: Path, tmp_path: Path) -> None:
    """`--recipe cifar10-paper --iters 6 --resume` on a run made with `--iters 4`: the run keeps
    its own milestones (scaled from 32k/48k of 64k when it began), so only its length changes."""
    out = tmp_path / "run"
    first = train_args(cifar_root, out, "--recipe", "cifar10-paper")
    first[first.index("--iters") + 1] = "4"
    assert main(first) == 0
    assert load_checkpoint(out / "last.pt")["config"]["milestones"] == [2, 3]
    longer = train_args(cifar_root, out, "--recipe", "cifar10-paper", "--resume")
    longer[longer.index("--iters") + 1] = "6"
    assert main(longer) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["step"], ckpt["config"]["iters"], ckpt["config"]["milestones"]) == (6, 6, [2, 3])


def test_an_output_that_is_an_input_is_refused_before_any_work(
    cifar_root: Path, run_copy: Path, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    ckpt = run_copy / "last.pt"
    before = digest(run_copy)
    img = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    img_bytes = img.read_bytes()
    data = ["--data", str(cifar_root), "--limit", "8"]
    fails_cleanly(["eval", "--checkpoint", str(ckpt), *data, "--json", str(ckpt)], capsys,
                  "--json", "one of this command's inputs")  # fmt: skip
    fails_cleanly(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out",
                   str(ckpt)], capsys, "--out", "would destroy it")  # fmt: skip
    fails_cleanly(["plot", str(run_copy), "--out", str(run_copy / "metrics.jsonl")], capsys,
                  "--out", "one of this command's inputs")  # fmt: skip
    fails_cleanly(["predict", str(img), "--checkpoint", str(ckpt), "--csv", str(img)], capsys,
                  "--csv", "one of this command's inputs")  # fmt: skip
    assert digest(run_copy) == before and img.read_bytes() == img_bytes
    # Paths that cannot be written are refused up front too, not after the work is done.
    fails_cleanly(["eval", "--checkpoint", str(ckpt), *data, "--json", str(tmp_path)], capsys,
                  "is a directory")  # fmt: skip
    fails_cleanly(["eval", "--checkpoint", str(ckpt), *data, "--out", str(img)], capsys,
                  "is a file")  # fmt: skip
    fails_cleanly(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out",
                   str(img / "x.onnx")], capsys, "is a file")  # fmt: skip


def test_recipes_and_run_configs_are_plain_utf8_yaml_without_aliases(
    cifar_root: Path, run_copy: Path, tmp_path: Path, capsys
) -> None:
    laughs = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    ) + "model_options: {depth: *i}\n"  # fmt: skip
    cases = {
        "laughs.yaml": (laughs.encode(), "YAML aliases (*"),
        "latin1.yaml": ("model: resnet20\n# caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        "tag.yaml": (b"lr: !!python/object/apply:os.system ['touch x']\n", "is not valid YAML"),
        # The last of two `lr:` lines had silently won.
        "twice.yaml": (
            b"lr: 0.1\nmomentum: 0.9\nlr: 0.2\n",
            ":3: 'lr' is given twice (first on line 1)",
        ),
        "nested.yaml": (b"model_options: {depth: 20, depth: 32}\n", "'depth' is given twice"),
        "nan.yaml": (
            b"warmup_lr: 0.01\nwarmup_until_error: .nan\n",
            "warmup_until_error must be a percentage",
        ),
        # Silently ignored before: CIFAR runs compute their own statistics.
        "stats.yaml": (b"stats: /nonexistent/stats.pt\n", "is for image folders"),
    }
    for name, (raw, needle) in cases.items():
        (tmp_path / name).write_bytes(raw)
        fails_cleanly(train_args(cifar_root, tmp_path / name.replace(".", "_"), "--recipe",
                                 str(tmp_path / name)), capsys, f"recipe {tmp_path / name}", needle)  # fmt: skip
    assert not (tmp_path / "x").exists() and not Path("x").exists()
    # The same aliases typed as a --set value.
    fails_cleanly(train_args(cifar_root, tmp_path / "s", "--set", "milestones=[&m 9, *m]"),
                  capsys, "--set value", "YAML aliases (*m)")  # fmt: skip
    fails_cleanly(train_args(cifar_root, tmp_path / "s", "--set", "model_options={a: 1, a: 2}"),
                  capsys, "--set value", "'a' is given twice")  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(train_args(cifar_root, tmp_path / "s", "--time-limit", "nan"))
    assert (
        e.value.code == 2
        and "must be a number of seconds > 0, got 'nan'" in capsys.readouterr().err
    )
    assert not (tmp_path / "s").exists()


def test_a_damaged_or_missing_config_yaml_resumes_on_last_pts_configuration(
    cifar_root: Path, run_copy: Path, capsys
) -> None:
    """config.yaml is the base --resume changes; read as the defaults when damaged, the
    trainer's refusal had blamed a changed setting (milestones). last.pt holds the same
    configuration, and it is what the trainer compares with."""
    damages = {
        "not UTF-8": lambda p: p.write_bytes(b"model: resnet20\n\xff\xfe\n"),
        "holds a list, not a mapping": lambda p: p.write_text("- a\n"),
        "is empty": lambda p: p.write_text(""),
        "is missing": lambda p: p.unlink(),
    }
    for iters, (what, damage) in enumerate(damages.items(), start=3):
        damage(run_copy / "config.yaml")
        argv = ["train", "--out", str(run_copy), "--resume", "--data", str(cifar_root)]
        assert main([*argv, "--iters", str(iters)]) == 0, what
        err = capsys.readouterr().err
        assert what in err and "resuming with the configuration stored in last.pt" in err, err
        assert "error" not in err and "Traceback" not in err
        assert load_checkpoint(run_copy / "last.pt")["step"] == iters
        doc = yaml.safe_load((run_copy / "config.yaml").read_text())  # written again
        assert doc["train_subset"] == 64 and "_run" in doc
    # Without last.pt there is nothing to take it from: one line naming the file and the fix.
    (run_copy / "config.yaml").write_text("- a\n")
    (run_copy / "last.pt").unlink()
    fails_cleanly(["train", "--out", str(run_copy), "--resume", "--data", str(cifar_root)],
                  capsys, "config.yaml holds a list", "no last.pt", "--recipe NAME")  # fmt: skip


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_data_path_that_is_a_file_is_named_with_where_it_came_from(
    how: str, tmp_path: Path, monkeypatch, capsys, finished_run: Path
) -> None:
    """Below a file the commands had named impossible paths (FILE/cifar-10-batches-py/...:
    Not a directory), or blamed --data for $RESLAB_DATA."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.chdir(tmp_path)
    if how == "env":
        monkeypatch.setenv("RESLAB_DATA", str(afile))
        data, origin = [], f"$RESLAB_DATA ({afile}) is a file"
    else:
        monkeypatch.delenv("RESLAB_DATA", raising=False)
        data, origin = ["--data", str(afile)], f"--data {afile} is a file"
    ckpt = str(finished_run / "last.pt")
    for argv in (
        ["train", "--model", "resnet20", "--iters", "2", "--out", "t", *data],
        ["eval", "--checkpoint", ckpt, "--out", "e", *data],
        ["demo", "--out", "d", *data],
        ["reproduce", "table6", "--budget", "smoke", "--out", "r", *data],
    ):
        line = fails_cleanly(argv, capsys, origin, "give the directory that holds")
        assert ("class folders" in line) == (argv[0] in ("train", "eval")), line
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_devices_compile_modes_and_splits_are_checked_up_front(
    cifar_root: Path, run_copy: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "r"
    for extra, needle in (
        (["--device", "gpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (["--set", "compile_mode=bogus", "--compile"], "compile_mode must be one of"),
        (["--set", "eval_splits=[test, bogus]"], "eval_splits may hold val and test"),
    ):
        fails_cleanly(train_args(cifar_root, out, *extra), capsys, needle)
    assert not out.exists()
    if not torch.cuda.is_available():
        fails_cleanly(train_args(cifar_root, out, "--device", "cuda:3"), capsys, "cuda:3")
    fails_cleanly(["eval", "--checkpoint", str(run_copy / "last.pt"), "--data", str(cifar_root),
                   "--device", "gpu"], capsys, "--device gpu: not a device")  # fmt: skip


def test_eval_of_a_checkpoint_with_foreign_weights_or_metadata_is_one_line(
    cifar_root: Path, run_copy: Path, capsys
) -> None:
    import reslab

    ckpt = load_checkpoint(run_copy / "last.pt")
    argv = ["eval", "--checkpoint", str(run_copy / "last.pt"), "--data", str(cifar_root),
            "--limit", "8"]  # fmt: skip
    save_atomic({**ckpt, "model": reslab.create_model("resnet20", num_classes=100).state_dict()},
                run_copy / "last.pt")  # right keys, another head shape  # fmt: skip
    fails_cleanly(argv, capsys, "last.pt: its weights do not fit resnet20")
    save_atomic({**ckpt, "preprocess": "abc"}, run_copy / "last.pt")
    fails_cleanly(argv, capsys, "last.pt: preprocess is a str, not a mapping")
    save_atomic({**ckpt, "classes": [*ckpt["classes"], "x", "y"]}, run_copy / "last.pt")
    fails_cleanly(argv, capsys, "last.pt: its metadata names 12 classes but the model has 10")


def test_report_and_stats_outputs_that_cannot_be_written_are_refused_first(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    fails_cleanly(["reproduce", "table6", "--budget", "smoke", "--out", str(afile)], capsys,
                  "is a file; give a folder")  # fmt: skip
    fails_cleanly(["data", "stats", str(cifar_root), "--out", str(tmp_path)], capsys,
                  "is a directory")  # fmt: skip
    assert afile.read_text() == "mine"


def test_outputs_into_the_data_or_an_unwritable_folder_are_refused_first(
    cifar_root: Path, run_copy: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data stats DIR --out DIR/...` had written its .pt over an image (or a CIFAR batch) of
    the data it read; `eval --out` into an image folder's class folder would add a PNG that the
    next training run reads as an image; an unwritable folder ended export, eval, plot and data
    stats with a traceback, eval's after the whole evaluation."""
    from PIL import Image

    folder = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (60 * i, 90, 20)).save(folder / c / f"{i}.png")
    target = folder / "cat" / "0.png"
    before = target.read_bytes()
    fails_cleanly(["data", "stats", str(folder), "--out", str(target)], capsys,
                  "inside this command's data", "choose another --out")  # fmt: skip
    fails_cleanly(["data", "stats", str(folder), "--out", str(folder / "stats.pt")], capsys,
                  "inside this command's data")  # fmt: skip
    assert target.read_bytes() == before and not (folder / "stats.pt").exists()
    ckpt = run_copy / "last.pt"
    fails_cleanly(["eval", "--checkpoint", str(ckpt), "--dataset", "folder", "--data",
                   str(folder), "--out", str(folder / "dog")], capsys,
                  "inside this command's data")  # fmt: skip
    assert sorted(p.name for p in (folder / "dog").iterdir()) == ["0.png", "1.png", "2.png"]
    # Unwritable (tests run as root, which may write anywhere: the check is os.access's answer).
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: os.fspath(p) != str(ro) and real_access(p, m))
    for argv in (
        ["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(ro / "m.onnx")],
        ["plot", str(run_copy), "--out", str(ro / "c.png")],
        ["data", "stats", str(folder), "--out", str(ro / "s.pt")],
        ["eval", "--checkpoint", str(ckpt), "--data", str(cifar_root), "--limit", "8",
         "--out", str(ro / "eval")],
    ):  # fmt: skip
        fails_cleanly(argv, capsys, f"{ro} is not writable (permission denied)")
    assert list(ro.iterdir()) == []


def test_atomically_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    """mkstemp makes files owner-only: checkpoints and records were 0600 where every other file
    of a run is 0644 (under umask 022), unreadable to the group in a shared results folder."""
    from reslab.runtime.checkpoint import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        save_atomic({"x": torch.zeros(2)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.json": 0o644, "b.pt": 0o644,
    }  # fmt: skip


def test_a_download_onto_a_file_and_negative_workers_are_one_line(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    fails_cleanly(["data", "download", str(afile)], capsys, str(afile), "is a file, not a folder")
    assert afile.read_text() == "mine"
    # ... and says what to give instead ("File exists" had named no fix; audit D, bug 9)
    fails_cleanly(["data", "download", str(afile / "sub")], capsys, "is a file, not a folder")
    with pytest.raises(SystemExit) as e:
        main(["data", "stats", str(tmp_path), "--out", str(tmp_path / "s.pt"), "--workers", "-3"])
    assert e.value.code == 2 and "must be a whole number from 0 to 1024" in capsys.readouterr().err


def test_too_few_classes_or_images_to_validate(cifar_root: Path, tmp_path: Path, capsys) -> None:
    """--num-classes below the data's class count was an IndexError at the first step (above
    it, a head with unnamed outputs); a folder
    with one image per class held out none, trained, then crashed evaluating an empty split."""
    from PIL import Image

    fails_cleanly(train_args(cifar_root, tmp_path / "nc", "--num-classes", "5"), capsys,
                  "num_classes 5 is fewer than the 10 classes")  # fmt: skip
    # More: outputs without a sample or a name, in files that reading would refuse.
    fails_cleanly(train_args(cifar_root, tmp_path / "nc", "--num-classes", "12"), capsys,
                  "num_classes 12 is more than the 10 classes")  # fmt: skip
    assert not (tmp_path / "nc").exists()
    tiny = tmp_path / "tiny"
    for i, c in enumerate(("cat", "dog")):
        (tiny / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200 * i, 40, 90)).save(tiny / c / "0.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny), "--model", "resnet20", "--iters", "2",
                 "--set", "image_size=32", "--set", "resize=32", "--out", str(out)]) == 0  # fmt: skip
    said = capsys.readouterr()
    assert "validation: none (no class has 2 images to spare one of)" in said.err
    assert "done: 2 iterations, nothing evaluated" in said.out
    assert load_checkpoint(out / "last.pt")["step"] == 2


def test_a_checkpoint_with_damaged_tensor_bytes_is_refused_everywhere(
    cifar_root: Path, run_copy: Path, tmp_path: Path, capsys
) -> None:
    """torch's zip reader checks no CRC: bytes flipped inside a tensor loaded silently, also on
    --resume. Checkpoints now carry a digest of their contents, checked on every load."""
    import zipfile

    last = run_copy / "last.pt"
    good = load_checkpoint(last)
    assert len(good["digest"]) == 64
    raw = bytearray(last.read_bytes())
    with zipfile.ZipFile(last) as z:  # the largest tensor's record, stored uncompressed
        big = max(z.infolist(), key=lambda i: i.file_size)
    start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
    for i in range(start + big.file_size // 2, start + big.file_size // 2 + 64):
        raw[i] ^= 0x5A
    last.write_bytes(bytes(raw))
    for argv in (
        ["eval", "--checkpoint", str(last), "--data", str(cifar_root), "--limit", "8"],
        ["export", "--checkpoint", str(last), "--format", "onnx", "--out", str(tmp_path / "m")],
        ["train", "--out", str(run_copy), "--resume", "--data", str(cifar_root)],
    ):
        fails_cleanly(argv, capsys, f"{last}: damaged", "digest")
    # Re-saved through reslab (a test or tool editing a checkpoint), the digest is recomputed.
    save_atomic({**good, "step": 1}, last)
    assert load_checkpoint(last)["step"] == 1


def test_absurd_image_sizes_are_refused_before_any_allocation(
    cifar_root: Path, tmp_path: Path, capsys
) -> None:
    """`pad: 1000000` reached a 3 PB allocation traceback at the first batch; `data stats
    --crop-size 100000` a 36 GB one."""
    out = tmp_path / "run"
    for setting, needle in (
        ("pad=1000000", "pad must be 0..32 pixels"),
        ("image_size=100000", "image_size must be 8..4096 pixels"),
        ("resize=100000", "resize must be 8..8192 pixels"),
    ):
        fails_cleanly(train_args(cifar_root, out, "--set", setting), capsys, needle)
    assert not out.exists()
    stats = ["data", "stats", str(cifar_root), "--out", str(tmp_path / "s.pt")]
    for flag, value in (("--crop-size", "100000"), ("--resize", "5"), ("--min-size", "-5")):
        argv = (
            [*stats, flag, value]
            if flag != "--min-size"
            else ["data", "check", str(tmp_path), flag, value]
        )
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and value in capsys.readouterr().err
    folder = tmp_path / "imgs"
    fails_cleanly(
        ["data", "stats", str(folder), "--out", str(tmp_path / "s.pt"), "--crop-size", "300"],
        capsys, "--crop-size 300 is larger than --resize 256",
    )  # fmt: skip


def test_running_out_of_memory_is_one_line_and_keeps_the_run(
    run_copy: Path, cifar_root: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch too large for the machine: torch's allocator fails (a RuntimeError, or CUDA's
    OutOfMemoryError); the user gets one line that says so, and the run's files survive."""
    from reslab.engine.trainer import Trainer

    before = digest(run_copy)

    def fit(self, *a, **k):
        torch.empty(2**62, dtype=torch.uint8)  # the allocator's own refusal, not a stand-in

    monkeypatch.setattr(Trainer, "fit", fit)
    line = fails_cleanly(
        ["train", "--out", str(run_copy), "--resume", "--data", str(cifar_root), "--iters", "4"],
        capsys, "out of memory (4,294,967,296.0 GiB asked for)", "lower --batch-size",
    )  # fmt: skip
    assert line.startswith("reslab train: error:")
    assert digest(run_copy) == before


def test_ctrl_c_is_one_line_that_says_how_to_continue(
    run_copy: Path, cifar_root: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reslab.engine.trainer import Trainer

    before = digest(run_copy)

    def fit(self, *a, **k):
        raise KeyboardInterrupt  # what Python raises in the main thread on SIGINT

    monkeypatch.setattr(Trainer, "fit", fit)
    rc = main(["train", "--out", str(run_copy), "--resume", "--data", str(cifar_root)])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert f"reslab train: error: interrupted; `reslab train --out {run_copy} --resume`" in err
    assert digest(run_copy) == before


def _default_sigint() -> None:
    """For a child process: SIGINT's default action, so that its Python installs its handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_real_sigint_before_the_first_checkpoint(cifar_root: Path, tmp_path: Path) -> None:
    """SIGINT to a real `reslab train` process: exit 130, one line, no traceback, and advice
    that works (nothing was saved, so not --resume: the same command again trains)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    never = ["--iters", "100000", "--eval-every", "100000", "--save-every", "100000"]
    argv = [sys.executable, "-m", "reslab", *train_args(cifar_root, out, *never)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "steps.jsonl").exists() or not (out / "steps.jsonl").stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert [ln for ln in err.splitlines() if "error:" in ln] == [
        "reslab train: error: interrupted; nothing was saved yet: the command without --resume "
        "starts it again"
    ]
    assert not (out / "last.pt").exists()
    assert main(train_args(cifar_root, out)) == 0  # the advice holds


def test_a_ctrl_c_swallowed_inside_a_step_still_stops_the_run(
    cifar_root: Path, tmp_path: Path, capsys, swallowed_sigint
) -> None:
    """SIGINT whose KeyboardInterrupt lands in code that swallows it (here a forward hook's
    try/except; in the wild a __del__ or a callback) stops the run at the next step anyway."""
    import signal

    from reslab.models import cifar

    calls = swallowed_sigint(cifar.CifarResNet, 3)
    out = tmp_path / "run"
    argv = train_args(cifar_root, out, "--iters", "40", "--eval-every", "40", "--save-every", "40")
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert calls[0] == 3  # not one step more
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_runs_trained_with_a_wider_head_than_their_classes_still_load_and_resume(
    cifar_root: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--num-classes 12 on CIFAR-10 was allowed before this session's checks: such a run's
    files (10 names, 12 outputs) must still predict and resume. (`reslab eval` has always
    refused a head wider than the data set's classes.) The old run is made for real, with the
    new refusal switched off."""
    from PIL import Image

    import reslab.engine.trainer as trainer_module

    real_check = trainer_module.check_num_classes
    monkeypatch.setattr(trainer_module, "check_num_classes", lambda *a, **k: None)
    run = tmp_path / "wide"
    assert main(train_args(cifar_root, run, "--num-classes", "12")) == 0
    monkeypatch.setattr(trainer_module, "check_num_classes", real_check)
    last = run / "last.pt"
    ckpt = load_checkpoint(last)
    assert len(ckpt["classes"]) == 10 and ckpt["model"]["fc.bias"].shape == (12,)
    ckpt["model"]["fc.bias"][10:] = 50.0  # the unnamed outputs win: their label is checked
    save_atomic(ckpt, last)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(last), "--topk", "2"]) == 0
    assert "(output 1" in capsys.readouterr().out
    assert main(train_args(cifar_root, run, "--resume", "--iters", "3",
                           "--num-classes", "12")) == 0  # fmt: skip
    assert load_checkpoint(last)["step"] == 3
    # A momentum buffer that does not fit its parameter had aborted the process.
    ckpt = load_checkpoint(last)
    state = ckpt["optimizer"]["state"]
    key = max(state, key=lambda k: state[k]["momentum_buffer"].numel())
    state[key]["momentum_buffer"] = state[key]["momentum_buffer"].flatten()[:7].clone()
    save_atomic(ckpt, last)
    fails_cleanly(train_args(cifar_root, run, "--resume", "--iters", "4", "--num-classes", "12"),
                  capsys, "momentum buffer of shape [7]")  # fmt: skip


def test_resume_may_raise_the_bomb_limit(cifar_root: Path, run_copy: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """The bomb message says to raise --max-pixels; resuming a folder run with it had been
    refused as 'another configuration'. (A CIFAR run has no such limit: the flag is refused.)"""
    from PIL import Image

    data = tmp_path / "imgs"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 100 if c == "a" else 10, 30)).save(
                data / c / f"{i}.png"
            )
    out = tmp_path / "folder-run"
    argv = ["train", "--model", "resnet20", "--dataset", "folder", "--data", str(data), "--out",
            str(out), "--device", "cpu", "--precision", "fp32", "--set", "image_size=32",
            "--set", "resize=36", "--set", "batch_size=4", "--set", "workers=0",
            "--set", "eval_splits=[]", "--set", "val_fraction=0"]  # fmt: skip
    assert main([*argv, "--iters", "2"]) == 0
    assert main([*argv, "--resume", "--iters", "3", "--max-pixels", "5000000000"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 3
    capsys.readouterr()
    assert main(train_args(cifar_root, run_copy, "--resume", "--iters", "3", "--max-pixels",
                           "5000000000")) == 2  # fmt: skip
    assert "--max-pixels limits the images read from an image folder" in capsys.readouterr().err


def test_temporaries_of_a_resumes_logs_and_a_reports_records_are_ones_kills_clean_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume's truncation of steps.jsonl and a report's copies of run records write through
    temporaries that rundir.clean_stale_temps removes after a kill (`.NAME.XXXX.tmp`); theirs
    had been `.NAME.tmpPID`, left for good (helper audit D, bug 5)."""
    from reslab.engine.run_log import RunLog
    from reslab.engine.rundir import clean_stale_temps
    from reslab.experiments.report import copy_records

    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.jsonl").write_text("".join(f'{{"iter": {i}}}\n' for i in (1, 2, 3)))
    (run / "metrics.jsonl").write_text('{"iter": 3, "val_error": 50.0}\n')
    (run / "config.yaml").write_text("model: resnet20\n")
    temps: list[Path] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: temps.append(Path(a)) or real(a, b))
    RunLog(run, resume_step=2, tensorboard=False).close()  # keeps the rows up to iteration 2
    copy_records(run, tmp_path / "records")
    monkeypatch.setattr(os, "replace", real)
    assert (run / "steps.jsonl").read_text() == '{"iter": 1}\n{"iter": 2}\n'
    assert temps and all(t.name.startswith(".") and t.name.endswith(".tmp") for t in temps)
    for t in temps:  # what a kill before the rename would have left: removed at the next start
        t.write_text("partial")
    clean_stale_temps(run)
    clean_stale_temps(tmp_path / "records")
    assert not [t for t in temps if t.exists()]
