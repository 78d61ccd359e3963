"""The one base class for mistakes a user can fix (a path, a flag, a file), so that every command
can print them as one line with exit code 2 instead of a traceback."""

from __future__ import annotations

import pickle
from typing import Any


class UserError(ValueError):
    """Bad input: the message names the file or flag and says how to fix it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


# The layout of what Trainer._checkpoint writes; a file with another version is refused on load.
CHECKPOINT_VERSION = 1


def check_checkpoint_version(ckpt: dict, path: object) -> None:
    """Refuse a reslab checkpoint of another layout (runtime.checkpoint, models.weight_formats)."""
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt.get('version')!r}, but this reslab reads "
            f"version {CHECKPOINT_VERSION}; use the reslab version that wrote it"
        )


class TorchScriptFileError(UserError):
    """A TorchScript archive (torch.jit.save) given where reslab reads tensors."""


def is_torchscript_archive(path: object) -> bool:
    """Whether `path` is a TorchScript archive: a zip whose top folder holds constants.pkl or
    code/ (what torch.jit.save writes; torch.save's zips hold data.pkl). Only the zip's list of
    names is read: nothing is unpickled."""
    import os
    import zipfile

    try:
        with zipfile.ZipFile(os.fspath(path)) as z:  # type: ignore[arg-type]
            names = z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):  # not a zip (a pickle, safetensors, ...)
        return False
    inner = [n.split("/", 1)[1] for n in names if "/" in n]
    return any(n == "constants.pkl" or n.startswith("code/") for n in inner)


def safe_torch_load(path: object, *, map_location: object = "cpu") -> Any:
    """reslab's only torch.load: weights_only=True, so a file yields tensors and plain
    containers but can never run code (pickled globals are refused). A TorchScript archive is
    refused by name first: torch.load would only say it cannot use weights_only with it."""
    import warnings

    import torch

    if is_torchscript_archive(path):
        raise TorchScriptFileError(
            f"{path} is a TorchScript export, not weights; pass the checkpoint or a safetensors "
            "file it came from (or load it with torch.jit.load)"
        )
    with warnings.catch_warnings():
        # torch warns (two lines on stderr) before it refuses a pickle of another protocol; the
        # refusal itself becomes reslab's one line, so the warning only adds noise.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive",
                                category=UserWarning)  # fmt: skip
        return torch.load(path, map_location=map_location, weights_only=True)


def first_line(text: object) -> str:
    """The first non-empty line of a message ('' for none): library errors can span many lines."""
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def torch_load_failure(e: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one line and without torch's advice to load
    with weights_only=False (which would run whatever code the file holds)."""
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights only" in msg.lower():
        for line in msg.splitlines():
            s = line.strip()
            if "GLOBAL" in s:
                return f"{s.rstrip('.')}; reslab never unpickles code"
            if s.startswith("Unsupported operand"):  # random bytes, or a damaged pickle
                return s.rstrip(".")
        return "it needs more than tensors and containers to unpickle; reslab never runs code"
    line = first_line(msg).split(". ")[0]  # torch's first sentence; its advice follows
    if "weights_only" in line:
        line = ""
    return type(e).__name__ + (f": {line}" if line else "")


def check_output_file(
    out: object,
    flag: str,
    inputs: list[object] | tuple[object, ...] = (),
    *,
    create_parent: bool = False,
    input_dirs: list[object] | tuple[object, ...] = (),
    folder: bool = False,
) -> None:
    """Refuse, before any work, an output FILE path (a folder with `folder`) that cannot be
    written, that is one of the command's own inputs (`eval --json CKPT`, `export --out
    WEIGHTS`), or that lies inside one of its input folders (`data stats DIR --out
    DIR/cat/0.jpg`): writing it would destroy or change what the command reads."""
    import os

    if out is None:
        return
    path = os.fspath(out)  # type: ignore[arg-type]
    if os.path.isdir(path) and not folder:
        raise UserError(f"{flag} {path} is a directory; give a file name (e.g. {path}/out)")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a folder")
    full = os.path.realpath(path)
    for d in input_dirs:
        if d is not None and os.path.isdir(os.fspath(d)):  # type: ignore[arg-type]
            root = os.path.realpath(os.fspath(d))  # type: ignore[arg-type]
            if full == root or full.startswith(root.rstrip(os.sep) + os.sep):
                raise UserError(
                    f"{flag} {path} is inside this command's data {d}; writing there would "
                    f"change the data set: choose another {flag}"
                )
    parent = path if folder and os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if create_parent or folder:  # the command makes missing folders: only a file in the way
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "is a file" if os.path.exists(parent) else "does not exist"
        raise UserError(f"{flag} {path}: its folder {parent} {what}; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable (permission denied); "
                        f"choose another {flag}")  # fmt: skip
    if not os.path.exists(path) or folder:
        return
    for src in inputs:
        try:
            same = src is not None and os.path.samefile(path, os.fspath(src))  # type: ignore[arg-type]
        except OSError:
            same = False
        if same:
            raise UserError(
                f"{flag} {path} is one of this command's inputs ({src}); writing it would destroy "
                f"it: choose another {flag}"
            )
