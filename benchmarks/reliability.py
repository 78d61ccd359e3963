"""The reliability campaign of issue 13: bad input and faults against the real `reslab` CLI.

Every case runs `python -m reslab ...` as a subprocess on real CIFAR-10 (tiny subsets, ResNet-20)
or on real PNG folders and real weights files, and is judged from outside:
  handled    exit code 2 and exactly one `error:` line holding the expected words, no traceback,
             never the advice weights_only=False (or, for cases that must succeed, exit 0 and the
             expected result on disk)
  data lost  a file of an existing run changed or vanished when the command should have left it
             alone, or a resumed run's files differ from an uninterrupted run's
  code run   a marker file that the crafted pickles would create exists afterwards
  hang       the command outlived --timeout seconds
Then N SIGKILLs at random moments of one run, each followed by --resume; the final last.pt's
model and optimizer tensors (and best.pt, metrics.jsonl) must equal an uninterrupted run's.
Disk full runs on a 3 MB tmpfs when `mount -t tmpfs` works (root), else it is reported as skipped.

    python benchmarks/reliability.py --data ../shared/data [--kills 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import hardware, load_average

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Evil:
    """Unpickling this would run `touch MARKER`: the code a crafted file carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Case:
    name: str
    argv: list[str]
    needle: str = ""  # words the one error line must hold ("" with ok=True)
    ok: bool = False  # the command must succeed (exit 0) instead
    keep: list[Path] = field(default_factory=list)  # run directories that must stay unchanged
    check: Callable[[str], bool] | None = None  # further test of the outcome (stderr given)


@dataclass
class Outcome:
    name: str
    handled: bool
    lost: bool
    code_ran: bool
    hung: bool
    seconds: float
    detail: str


def reslab(*argv: str | Path, timeout: float) -> tuple[int | None, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "reslab", *map(str, argv)], env=ENV,
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        return p.returncode, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err, time.perf_counter() - t0


def digest(run: Path) -> dict[str, str]:
    if not run.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())
            if p.is_file() and not p.name.startswith(".")}  # fmt: skip


def error_line(err: str) -> list[str]:
    return [ln for ln in err.replace("\r", "\n").splitlines() if "error:" in ln]


def run_case(case: Case, marker: Path, timeout: float) -> Outcome:
    before = {d: digest(d) for d in case.keep}
    rc, err, secs = reslab(*case.argv, timeout=timeout)
    lines = error_line(err)
    if case.ok:
        handled = rc == 0 and "Traceback" not in err
    else:
        handled = (
            rc == 2 and len(lines) == 1 and case.needle in lines[0] and "Traceback" not in err
            and "weights_only=False" not in err
        )  # fmt: skip
    if handled and case.check is not None:
        handled = case.check(err)
    lost = any(digest(d) != before[d] for d in case.keep)
    detail = lines[0] if lines else (err.strip().splitlines() or [""])[-1]
    return Outcome(case.name, handled, lost, marker.exists(), rc is None, secs, detail[:160])


# --- fixtures ------------------------------------------------------------------------------


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "resnet20", "--data", str(data), "--out", str(out), "--device",
        "cpu", "--precision", "fp32", "--iters", "2", "--eval-every", "2", "--no-channels-last",
        "--set", "train_subset=64", "--set", "eval_subset=32", "--set", "batch_size=32",
        "--set", "eval_splits=[test]", "--set", "val_split=false", *extra,
    ]  # fmt: skip


def cifar_copy(data: Path, dst: Path, *, replace: str | None = None) -> Path:
    src, d = data / "cifar-10-batches-py", dst / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != replace:
            (d / f.name).symlink_to(f)
    return d


def pngs(d: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")


def reslab_safetensors(path: Path, options: dict, classes: list[str] | None = None) -> Path:
    from safetensors.torch import save_file

    from reslab.models import create_model

    sd = {k: v.contiguous() for k, v in create_model("resnet20").state_dict().items()}
    save_file(sd, str(path), metadata={"format": "reslab", "model_name": "resnet20",
                                       "model_options": json.dumps(options),
                                       "preprocess": "null", "classes": json.dumps(classes)})  # fmt: skip
    return path


def build_cases(data: Path, w: Path, template: Path, marker: Path) -> list[Case]:
    """Each case with the files it needs, made under `w`."""

    def run_from_template(name: str) -> Path:
        dst = w / "runs" / name
        shutil.copytree(template, dst)
        return dst

    cases: list[Case] = []
    add = cases.append
    f = w / "a_file"
    f.write_text("not a directory\n")
    # Config and flags.
    add(Case("--set lr=1e-3 is a float", train_argv(data, w / "r_lr", "--set", "lr=1e-3"), ok=True,
             check=lambda _: "lr: 0.001" in (w / "r_lr" / "config.yaml").read_text()))  # fmt: skip
    for name, extra, needle in [
        ("--set batch_size=0", ["--set", "batch_size=0"], "batch_size must be"),
        ("--iters -5", ["--iters", "-5"], "--iters: must be a whole number >= 1"),
        ("--set eval_every=ten", ["--set", "eval_every=ten"], "eval_every expects"),
        ("--set unknown field", ["--set", "colour=red"], "unknown config field 'colour'"),
        ("--model unknown", ["--model", "resnet21"], "unknown model 'resnet21'"),
        ("--recipe unknown", ["--recipe", "cifar10-nope"], "no recipe"),
        ("--set momentum=1.5", ["--set", "momentum=1.5"], "momentum must be in [0, 1)"),
    ]:
        argv = train_argv(data, w / "r_flags", *extra)
        if extra[0] == "--model":  # the flag given twice: argparse keeps the last
            argv = [*train_argv(data, w / "r_flags"), *extra]
        add(Case(name, argv, needle))
    add(Case("--data is a file", train_argv(f, w / "r_df"), f"--data {f} is a file"))
    add(Case("--out is a file", train_argv(data, f), "is a file, not a directory"))
    # CIFAR files.
    d = cifar_copy(data, w / "c_missing", replace="data_batch_3")
    add(Case("CIFAR batch missing", train_argv(w / "c_missing", w / "r_c1"),
             f"{d / 'data_batch_3'} is missing"))  # fmt: skip
    d = cifar_copy(data, w / "c_trunc", replace="data_batch_2")
    raw = (data / "cifar-10-batches-py" / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(raw[: len(raw) // 3])
    add(Case("CIFAR batch truncated", train_argv(w / "c_trunc", w / "r_c2"),
             str(d / "data_batch_2")))  # fmt: skip
    d = cifar_copy(data, w / "c_evil", replace="test_batch")
    (d / "test_batch").write_bytes(pickle.dumps({"data": Evil(marker), "labels": [0]}))
    add(Case("CIFAR batch with code: train", train_argv(w / "c_evil", w / "r_c3"), "not allowed"))
    add(Case("CIFAR batch with code: eval", ["eval", "--checkpoint", template / "last.pt",
             "--data", w / "c_evil", "--limit", "8"], "not allowed"))  # fmt: skip
    # Resuming a run directory.
    for name, content in [("last.pt zero bytes", b""), ("last.pt random bytes", os.urandom(8192))]:
        r = run_from_template(name.replace(" ", "_"))
        (r / "last.pt").write_bytes(content)
        add(Case(name, train_argv(data, r, "--resume"), str(r / "last.pt"), keep=[r]))
    r = run_from_template("last_code")
    torch.save({"format": "reslab", "version": 1, "x": Evil(marker)}, r / "last.pt")
    add(Case("last.pt with code", train_argv(data, r, "--resume"), "never unpickles code",
             keep=[r]))  # fmt: skip
    r = run_from_template("no_last")
    (r / "last.pt").unlink()
    add(Case("--resume, last.pt missing", train_argv(data, r, "--resume"), "no last.pt",
             keep=[r]))  # fmt: skip
    r = run_from_template("other_model")
    argv = train_argv(data, r, "--resume")
    argv[argv.index("resnet20")] = "resnet32"
    add(Case("--resume with another model", argv, "model: 'resnet20' -> 'resnet32'", keep=[r]))
    r = run_from_template("other_recipe")
    add(Case("--resume with another recipe", train_argv(data, r, "--resume", "--recipe",
             "cifar10-fast"), "another configuration", keep=[r]))  # fmt: skip
    r = run_from_template("other_version")
    ck = torch.load(r / "last.pt", weights_only=True)
    torch.save({**ck, "version": 7}, r / "last.pt")
    add(Case("checkpoint of another version", train_argv(data, r, "--resume"), "version 7",
             keep=[r]))  # fmt: skip
    r = run_from_template("fresh_over_run")
    add(Case("new run into a run's --out", train_argv(data, r), "--resume", keep=[r]))
    # (since session 40 refused: a mistyped --out had started a new run of the defaults)
    add(Case("--resume into an empty --out", train_argv(data, w / "r_empty", "--resume"),
             "nothing to resume"))  # fmt: skip
    r = run_from_template("stale_tmp")
    (r / ".last.pt.x1y2.tmp").write_bytes(b"half")
    add(Case("stale temp file after a kill", train_argv(data, r, "--resume", "--iters", "4"),
             ok=True, check=lambda _, r=r: not (r / ".last.pt.x1y2.tmp").exists()))  # fmt: skip
    # Data sets that cannot train.
    add(Case("training set < one batch", train_argv(data, w / "r_small", "--set",
             "train_subset=6", "--set", "batch_size=8"), "6 images but one batch needs 8"))  # fmt: skip
    folder_args = ["--dataset", "folder", "--model", "resnet18", "--set", "image_size=32",
                   "--set", "resize=36", "--set", "workers=0", "--set", "eval_splits=[]",
                   "--set", "train_subset=null"]  # fmt: skip
    pngs(w / "one_class" / "only", 6)
    add(Case("image folder with one class", [*train_argv(w / "one_class", w / "r_f1"),
             *folder_args], "a classifier needs at least two"))  # fmt: skip
    pngs(w / "six" / "a", 3)
    pngs(w / "six" / "b", 3, seed=1)
    add(Case("6 images at batch 8 (folder)", [*train_argv(w / "six", w / "r_f2"), *folder_args,
             "--set", "batch_size=8"], "6 images but one batch needs 8"))  # fmt: skip
    pngs(w / "loop" / "a", 4)
    pngs(w / "loop" / "b", 4, seed=2)
    (w / "loop" / "a" / "again").symlink_to(w / "loop" / "a", target_is_directory=True)
    add(Case("symlink loop in an image folder", [*train_argv(w / "loop", w / "r_f3"),
             *folder_args, "--set", "batch_size=4"], ok=True,
             check=lambda err: "already read" in err  # 2 batches of 4 = 1 epoch of 8 images
             and json.loads((w / "r_f3" / "metrics.jsonl").read_text())["epoch"] == 1.0))  # fmt: skip
    # Weights files.
    head = json.dumps({"w": {"dtype": "F32", "shape": [10**9, 1000],
                             "data_offsets": [0, 4 * 10**12]}}).encode()  # fmt: skip
    huge = w / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 64)
    wide = reslab_safetensors(w / "classes1e9.safetensors", {"num_classes": 10**9})
    bogus = reslab_safetensors(w / "bogus.safetensors", {"bogus_option": 1})
    rnd = w / "random.pt"
    rnd.write_bytes(os.urandom(5000))
    img = w / "img.png"
    pngs(w / "imgdir", 1)
    shutil.copy(w / "imgdir" / "0.png", img)
    for label, path, needle in [("safetensors header claims 4 TB", huge, "cannot be read"),
                                ("metadata num_classes 1e9", wide, "num_classes must be"),
                                ("metadata unknown option", bogus, "no model takes this option"),
                                ("weights file of random bytes", rnd, "not a readable")]:  # fmt: skip
        add(Case(f"{label}: export", ["export", "--weights", path, "--format", "onnx", "--out",
                 w / "m.onnx"], needle))  # fmt: skip
        add(Case(f"{label}: predict", ["predict", img, "--weights", path, "--normalize",
                 "cifar10"], needle))  # fmt: skip
        # (since session 41 also a class count no model can have, though train re-sizes the head)
        add(Case(f"{label}: train", train_argv(data, w / "r_w", "--weights", path), needle))
    # Session 22-23 audit findings.
    add(Case("--set pad=1000000 (a 3 PB batch)", train_argv(data, w / "r_pad", "--set",
             "pad=1000000"), "pad must be 0..32 pixels"))  # fmt: skip
    twice = w / "twice.yaml"
    twice.write_text("lr: 0.1\nmomentum: 0.9\nlr: 0.2\n")
    add(Case("recipe naming lr twice", train_argv(data, w / "r_twice", "--recipe", twice),
             "'lr' is given twice"))  # fmt: skip
    add(Case("--time-limit nan", train_argv(data, w / "r_tl", "--time-limit", "nan"),
             "must be a number of seconds > 0"))  # fmt: skip
    r = run_from_template("flipped_bytes")
    raw = bytearray((r / "last.pt").read_bytes())
    with zipfile.ZipFile(r / "last.pt") as z:  # the largest tensor's record, stored as is
        big = max(z.infolist(), key=lambda i: i.file_size)
    mid = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra) + big.file_size // 2
    for i in range(mid, mid + 64):  # torch's zip reader checks no CRC: only the digest sees it
        raw[i] ^= 0x5A
    (r / "last.pt").write_bytes(bytes(raw))
    add(Case("last.pt with flipped tensor bytes", train_argv(data, r, "--resume"), "damaged",
             keep=[r]))  # fmt: skip
    pngs(w / "statsdata" / "a", 2)
    pngs(w / "statsdata" / "b", 2, seed=3)
    victim = w / "statsdata" / "a" / "0.png"
    add(Case("data stats --out over an image", ["data", "stats", w / "statsdata", "--out",
             victim], "is inside this command's data", check=lambda _: victim.read_bytes()[:4] == b"\x89PNG"))  # fmt: skip
    script = w / "ts.pt"
    subprocess.run([sys.executable, "-m", "reslab", "export", "--checkpoint", template / "last.pt",
                    "--format", "torchscript", "--out", script], env=ENV, check=True,
                   capture_output=True)  # fmt: skip
    add(Case("a TorchScript export as --weights", ["predict", img, "--weights", script],
             "TorchScript export"))  # fmt: skip
    no = reslab_safetensors(w / "residual_no.safetensors", {"residual": "no"})
    add(Case("metadata residual: \"no\"", ["predict", img, "--weights", no, "--normalize",
             "cifar10"], "residual must be true or false"))  # fmt: skip
    names = [f"c{i}" for i in range(12)]
    extra = reslab_safetensors(w / "classes12.safetensors", {}, classes=names)
    add(Case("metadata with 12 class names for 10 outputs", ["predict", img, "--weights", extra,
             "--normalize", "cifar10"], "names 12 classes but the model has 10 outputs"))  # fmt: skip
    # Divergence.
    add(Case("NaN before any checkpoint", train_argv(data, w / "r_nan", "--set", "lr=1e30",
             "--set", "log_every=1", "--iters", "20", "--eval-every", "20"),
             "no checkpoint was written yet",
             check=lambda err: "--precision fp32" not in err))  # fmt: skip
    add(Case("NaN after a checkpoint", train_argv(data, w / "r_nan2", "--set", "log_every=1",
             "--iters", "30", "--eval-every", "100", "--save-every", "10", "--set",
             "milestones=[10]", "--set", "gamma=1e31"), "still holds the last good state "
             "(iteration 10)"))  # fmt: skip
    return cases


# --- the cases that need timing or a mount -------------------------------------------------


def second_writer(data: Path, w: Path, timeout: float) -> Outcome:
    out = w / "r_two"
    argv = train_argv(data, out, "--iters", "60", "--eval-every", "20", "--save-every", "20")
    t0 = time.perf_counter()
    a = subprocess.Popen([sys.executable, "-m", "reslab", *argv], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = out / ".reslab.lock"
    while not (lock.is_file() and lock.read_text().strip()) and a.poll() is None:
        time.sleep(0.05)
    rc_b, err_b, _ = reslab(*argv, timeout=timeout)
    try:
        a.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        a.kill()
        return Outcome("two runs into one --out", False, False, False, True, timeout, "hang")
    rows = [json.loads(x)["iter"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = error_line(err_b)
    handled = rc_b == 2 and len(lines) == 1 and "in use by another reslab run" in lines[0]
    lost = a.returncode != 0 or rows != [20, 40, 60]
    return Outcome("two runs into one --out", handled, lost, False, False,
                   time.perf_counter() - t0, lines[0][:160] if lines else err_b[-160:])  # fmt: skip


def disk_full(data: Path, w: Path, timeout: float) -> Outcome | str:
    mnt = w / "small_fs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        return f"disk full: skipped, `mount -t tmpfs` failed here ({p.stderr.strip()})"
    try:
        out = mnt / "run"
        # ResNet-20's checkpoint (~2.2 MB) fits once in 3 MB; the second save's temporary
        # copy does not.
        case = Case("disk full during a save (3 MB tmpfs)", train_argv(data, out, "--iters", "4",
                    "--save-every", "2", "--eval-every", "100"), "no space left on device",
                    check=lambda err: str(out / "last.pt") in err)  # fmt: skip
        res = run_case(case, w / "MARKER", timeout)
        try:
            step = torch.load(out / "last.pt", weights_only=True)["step"]
        except Exception:  # any failure to read it back means it was lost
            step = None
        res.lost = res.lost or step != 2 or bool(list(out.glob(".*.tmp")))
        return res
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def kill_campaign(data: Path, w: Path, kills: int, seed: int) -> tuple[Outcome, int, int]:
    """N SIGKILLs at random moments, --resume after each; compare with an uninterrupted run."""
    argv = train_argv(data, Path("OUT"), "--iters", "36", "--eval-every", "12", "--save-every",
                      "3", "--seed", "7", "--set", "train_subset=96", "--set", "batch_size=16",
                      "--set", "val_split=true", "--set", "eval_splits=[val,test]",
                      "--set", "milestones=[20]", "--set", "log_every=3")  # fmt: skip

    def cmd(out: Path, resume: bool) -> list[str]:
        a = [str(out) if x == "OUT" else x for x in argv]
        return [sys.executable, "-m", "reslab", *a, *(["--resume"] if resume else [])]

    ref, out = w / "k_ref", w / "k_run"
    t0 = time.perf_counter()
    subprocess.run(cmd(ref, False), env=ENV, check=True, capture_output=True)
    duration = time.perf_counter() - t0
    rng = random.Random(seed)
    delivered = attempts = 0
    while delivered < kills and attempts < 4 * kills:
        attempts += 1
        resume = (out / "last.pt").exists()
        p = subprocess.Popen(cmd(out, resume), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)  # fmt: skip
        try:
            p.wait(timeout=rng.uniform(0.3, 1.0) * duration)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            delivered += 1
            continue
        if p.returncode != 0:
            err = p.stderr.read().decode()[-300:]
            return Outcome("SIGKILL + resume", False, True, False, False, 0, err), delivered, 0
        shutil.rmtree(out)  # finished before the kill: start over so every kill lands mid-run
    p = subprocess.run(cmd(out, (out / "last.pt").exists()), env=ENV, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    ta, tb = (dict(_tensors(x["model"]), **_tensors(x["optimizer"], "opt.")) for x in (a, b))
    same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    best_a = torch.load(ref / "best.pt", weights_only=True)
    best_ok = (out / "best.pt").is_file() and all(
        torch.equal(v, torch.load(out / "best.pt", weights_only=True)["model"][k])
        for k, v in best_a["model"].items()
    )
    strip = lambda t: [r.split('"images_per_s"')[0] for r in t.splitlines()]  # noqa: E731
    rows_ok = strip((out / "metrics.jsonl").read_text()) == strip(
        (ref / "metrics.jsonl").read_text()
    )
    stale = list(out.glob(".*.tmp"))
    ok = p.returncode == 0 and same and best_ok and rows_ok and not stale
    detail = (f"{delivered} kills, {len(ta)} tensors identical={same}, best.pt={best_ok}, "
              f"metrics={rows_ok}, stale tmp={len(stale)}")  # fmt: skip
    return Outcome("SIGKILL + resume", ok, not ok, False, False, 0, detail), delivered, len(ta)


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a state_dict (nested dicts/lists), by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}{i}."))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("RESLAB_DATA", "data"))
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a case hangs")
    args = ap.parse_args()
    data = Path(args.data).resolve()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reslab-reliability-") as tmp:
        w = Path(tmp)
        marker = w / "MARKER"  # what the crafted pickles would create
        template = w / "template"
        rc, err, _ = reslab(*train_argv(data, template), timeout=args.timeout)
        if rc != 0:
            sys.exit(f"could not make the template run: {err[-500:]}")
        results = [
            run_case(c, marker, args.timeout) for c in build_cases(data, w, template, marker)
        ]
        results.append(second_writer(data, w, args.timeout))
        notes = []
        full = disk_full(data, w, args.timeout)
        if isinstance(full, str):
            notes.append(full)
        else:
            results.append(full)
        killed, delivered, n_tensors = kill_campaign(data, w, args.kills, args.seed)
        results.append(killed)
    for r in results:
        flag = "ok  " if r.handled and not (r.lost or r.code_ran or r.hung) else "FAIL"
        print(f"{flag} {r.name:<42} {r.seconds:5.1f}s  {r.detail}")
    print(*notes, sep="\n")
    n = len(results)
    print(f"\ncases tried: {n} ({n - 1} commands + 1 campaign of {delivered} random SIGKILLs "
          f"with resume, {n_tensors} model/optimizer tensors compared)")  # fmt: skip
    print(f"handled with a clear message (or succeeded as they should): "
          f"{sum(r.handled for r in results)}/{n}")  # fmt: skip
    print(f"data lost: {sum(r.lost for r in results)}")
    print(f"code executed: {sum(r.code_ran for r in results)}")
    print(f"hangs: {sum(r.hung for r in results)}")
    print(f"{hardware()}; load average {load_average()}; {time.perf_counter() - t_start:.0f} s")
    bad = sum(not r.handled or r.lost or r.code_ran or r.hung for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
