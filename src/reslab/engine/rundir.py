"""Who owns a run directory, and what a run may find in it when it starts.

One writer at a time (a POSIX record lock that the kernel drops when the process dies, however
it dies), a resume only with the configuration the run was started with, and no temporary files
left over from a killed write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from reslab.errors import UserError
from reslab.runtime.checkpoint import write_text_atomic
from reslab.runtime.yaml_file import YamlFileError, read_yaml

LOCK_NAME = ".reslab.lock"
# Fields a resumed run may change: how long it runs and how often it reports or saves, and where
# and how it executes (the same set that `reslab reproduce` lets differ between calls). Anything
# else (model, data set, normalisation, optimiser, schedule, seed...) would mix two runs in one.
# `weights` only initialises a new run: a resumed one takes every weight from its checkpoint.
RESUME_MAY_CHANGE = frozenset({
    "iters", "epochs", "time_limit", "eval_every", "save_every", "log_every",
    "out", "data", "download", "device", "precision", "compile", "compile_mode", "workers",
    "fused_bn_act", "tiled_wgrad",
    "weights",
    # The bomb limit: raised to read an image a scan skipped (the message says how); the
    # images a folder run reads then change from the resumed step on.
    "max_pixels",
})  # fmt: skip
# Files whose presence means the directory holds a run worth keeping.
RUN_FILES = ("last.pt", "best.pt", "final.json", "metrics.jsonl")

_held: dict[str, int] = {}  # resolved run dir -> lock file descriptor held by this process
_created: set[str] = set()  # run dirs that acquire_lock made (removed again if left empty)


class RunDirError(UserError):
    """A run directory that this run may not use as asked; the message says why and the fix."""


class RunExistsError(RunDirError, FileExistsError):
    """A fresh run was asked for in a directory that holds a run."""


def check_out_path(out: Path) -> None:
    """--out must be a directory (or not exist yet)."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise RunDirError(f"--out {out}: {p} is a file, not a directory; choose another --out")


def check_out_outside_data(out: Path, data: str | None, dataset: str) -> None:
    """A run written into an image folder would become part of the data set (its folders new
    classes, its files scanned as images): refused. CIFAR's directory is read by name only."""
    if dataset != "folder" or not data:
        return
    root, o = Path(data).resolve(), out.resolve()
    if o == root or root in o.parents:
        raise RunDirError(
            f"--out {out} is inside the image folder --data {data}: the run's files would join "
            "the data set; choose an --out outside it"
        )


def acquire_lock(out: Path) -> None:
    """Take an exclusive lock on `out` for this process, or refuse naming the holder.

    A POSIX record lock (fcntl F_SETLK): it belongs to this process alone, so the kernel
    releases it the moment the process exits or is killed. (An flock would be shared with every
    forked child, DataLoader workers included, and outlive a killed trainer by the seconds its
    orphaned workers take to notice.) Such a lock also drops when this process closes any
    descriptor of the lock file, so nothing else here opens it.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held:  # this process already owns it (a library user retrying after an error)
        return
    if created:
        _created.add(key)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"{out} is in use by another reslab run (pid {holder}); wait for it to finish, or "
            "choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release_lock(out: Path) -> None:
    key = str(out.resolve())
    fd = _held.pop(key, None)
    if fd is None:
        return
    if key in _created:
        _created.discard(key)
        # A run refused before it wrote anything (bad data, a batch larger than the data set)
        # leaves no directory behind that it made itself: only its lock file would be in it.
        # Removed while the lock is still held, so no other run can be using it.
        try:
            if [e.name for e in os.scandir(out)] == [LOCK_NAME]:
                (out / LOCK_NAME).unlink()
                out.rmdir()
        except OSError:
            pass  # something appeared meanwhile: leave the directory as it is
    os.close(fd)  # drops the lock


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove the temporary files of writes a kill interrupted (`.NAME.XXXX.tmp`, see
    checkpoint._write_atomic). Only call with the lock held: a live writer's are not stale."""
    removed = []
    for p in out.glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_start(out: Path, *, resume: bool) -> None:
    """A fresh run never overwrites a run's results; a resume needs a checkpoint to resume from."""
    last = out / "last.pt"
    present = [n for n in RUN_FILES if (out / n).exists()]
    if resume and not last.exists() and present:
        raise RunDirError(
            f"--resume: {out} holds {', '.join(present)} but no last.pt to resume from; restore "
            "last.pt, or move those files away (or choose another --out) to start again"
        )
    if not resume and any(n != "metrics.jsonl" for n in present):
        # metrics.jsonl alone: a run killed before its first checkpoint; starting over is safe.
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(present)}); pass --resume to continue it, "
            "or choose another --out"
        )
    if not last.exists():
        foreign = _foreign_files(out)
        if foreign:
            # e.g. --out DIR where DIR/config.yaml is the user's own recipe: starting a run
            # there would replace it.
            raise RunExistsError(
                f"{out} holds {', '.join(foreign)} that no reslab run wrote (its config.yaml "
                "has no _run record); a run there would overwrite them: choose another --out"
            )


def _foreign_files(out: Path) -> list[str]:
    """Files a starting run writes (config.yaml, steps.jsonl, metrics.jsonl) that are already in
    `out` without a reslab run's config.yaml beside them: the user's, not an earlier run's."""
    names = [n for n in ("config.yaml", "steps.jsonl", "metrics.jsonl") if (out / n).exists()]
    if not names:
        return []
    try:
        doc = read_yaml(out / "config.yaml")
    except (OSError, YamlFileError):
        doc = None
    return [] if isinstance(doc, dict) and "_run" in doc else names


def config_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Fields (outside RESUME_MAY_CHANGE) whose values differ, as 'field: old -> new'."""
    diffs = []
    # Only fields both know: a field added to TrainConfig after the checkpoint was written
    # takes its default, and must not make every older run unresumable.
    for key in sorted(set(stored) & set(requested)):
        if key in RESUME_MAY_CHANGE:
            continue
        old, new = stored.get(key), requested.get(key)
        if old != new:
            diffs.append(f"{key}: {old!r} -> {new!r}")
    return diffs


def check_resume_classes(path: Path, stored: list[str] | None, found: list[str]) -> None:
    """The model's outputs mean the classes the run started with: a class folder renamed,
    added or removed since would silently train output i as another class."""
    if stored is None or list(stored) == list(found):
        return
    gone = [c for c in stored if c not in found]
    new = [c for c in found if c not in stored]
    what = "; ".join(
        x for x in (f"gone: {', '.join(gone[:5])}" if gone else "",
                    f"new: {', '.join(new[:5])}" if new else "") if x
    ) or "the same names in another order"  # fmt: skip
    raise RunDirError(
        f"--resume: {path} was trained on {len(stored)} classes and the data now has "
        f"{len(found)} ({what}); restore the class folders as they were, or start a new run "
        "(--weights LAST.pt fine-tunes from it)"
    )


def check_resume_config(path: Path, stored: dict[str, Any], requested: dict[str, Any]) -> None:
    diffs = config_differences(stored, requested)
    if diffs:
        raise RunDirError(
            f"--resume: {path} was trained with another configuration ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}); resume with the same settings (only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change), or choose another --out"
        )


def write_run_config(path: Path, config: dict[str, Any], run: dict[str, Any]) -> None:
    """config.yaml: the configuration and this process's provenance (`_run`); on a resume the
    earlier processes' provenance is kept in `_earlier_runs`, so it is never overwritten."""
    earlier: list[Any] = []
    if path.is_file():
        try:
            old = read_yaml(path) or {}
        except YamlFileError:  # the run-dir check named it already; keep no provenance from it
            old = {}
        if isinstance(old, dict):
            earlier = list(old.get("_earlier_runs") or [])
            if old.get("_run"):
                earlier.append(old["_run"])
    doc = {**config, "_run": run, **({"_earlier_runs": earlier} if earlier else {})}
    write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False))


def warn(msg: str) -> None:
    print(f"reslab: {msg}", file=sys.stderr, flush=True)
