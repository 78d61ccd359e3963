"""Checkpoints that survive a kill at any moment and can never run code when loaded."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from reslab.errors import (  # noqa: F401 (CHECKPOINT_VERSION: imported from here)
    CHECKPOINT_VERSION,
    CheckpointError,
    UserError,
    check_checkpoint_version,
    safe_torch_load,
    torch_load_failure,
)


class DiskFullError(UserError):
    """No space left while writing a file; the previous version of the file is unchanged."""


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it; put it straight back
    os.umask(mask)
    return mask


def check_target(path: str | Path, *, make_folder: bool = False) -> Path:
    """`path` as a file an atomic writer can replace, refused naming it (not the writer's
    temporary file, which is all the OS error would name): a folder there, or no folder for it
    (made instead with make_folder)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder is there; give a file name", str(path))
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder to write into", str(path.parent))
    return path


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """write() into a temporary file in the same directory, fsync, rename over `path`.

    A reader (or a resumed run) sees either the old file or the new one, never half of one; the
    temporary file is removed on any failure (and by rundir.clean_stale_temps after a kill).
    """
    check_target(path, make_folder=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only (0600); give it the mode any new file gets, so that
        # checkpoints and records in a shared results folder stay readable by the group.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(e):
            old = "the previous version is unchanged" if path.exists() else "nothing was written"
            raise DiskFullError(
                f"no space left on device while writing {path} ({old}); free space on "
                f"{path.parent} or choose another --out"
            ) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _is_disk_full(e: BaseException | None) -> bool:
    # torch.save's zip writer may raise its own RuntimeError while the ENOSPC OSError that
    # caused it rides along as __context__: look down the chain.
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and "write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (see _write_atomic); a reslab checkpoint (a dict
    with "format": "reslab") is written with its content digest (`seal`)."""
    if isinstance(obj, dict) and obj.get("format") == "reslab":
        obj = seal(obj)
    _write_atomic(Path(path), lambda f: torch.save(obj, f))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a text file atomically: a kill leaves the old or the new content, never half."""
    _write_atomic(Path(path), lambda f: f.write(text.encode()))


def write_file_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace `path` with what write(f) puts in a binary file, atomically: a kill leaves the
    old file or the new one, never a truncated one (a figure, a report, an export)."""
    _write_atomic(Path(path), write)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically (best.pt from the last.pt written at the same step)."""
    _write_atomic(Path(dst), lambda f: f.write(Path(src).read_bytes()))


DIGEST_KEY = "digest"  # sha256 over every other entry of a checkpoint (`seal`)


def content_digest(obj: Any) -> str:
    """sha256 over a checkpoint's contents: every tensor's dtype, shape and bytes and every
    other value's repr, with the key path of each. torch's zip reader checks no CRC, so bytes
    flipped inside a tensor (a bad disk, a broken copy) would otherwise load without a word."""
    h = hashlib.sha256()

    def walk(x: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            h.update(f"{where}:tensor:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                flat = t.reshape(-1).to("cpu").contiguous()
                h.update(memoryview(flat.view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            h.update(f"{where}:dict:{len(x)};".encode())
            for k, v in x.items():
                walk(v, f"{where}/{k!r}")
        elif isinstance(x, (list, tuple)):
            h.update(f"{where}:{type(x).__name__}:{len(x)};".encode())
            for i, v in enumerate(x):
                walk(v, f"{where}/{i}")
        else:
            h.update(f"{where}:{type(x).__name__}:{x!r};".encode())

    walk(obj, "")
    return h.hexdigest()


def seal(ckpt: dict) -> dict:
    """The checkpoint with its content digest added (verified by `check_digest` on load)."""
    body = {k: v for k, v in ckpt.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: content_digest(body)}


def check_digest(ckpt: dict, path: object) -> None:
    """Refuse a checkpoint whose contents no longer match the digest it was saved with. Files
    without one (written before it existed, or by hand) are taken as they are."""
    want = ckpt.get(DIGEST_KEY)
    if want is None:
        return
    body = {k: v for k, v in ckpt.items() if k != DIGEST_KEY}
    if not isinstance(want, str) or content_digest(body) != want:
        raise CheckpointError(
            f"{path}: damaged: its contents no longer match the digest it was saved with (a bad "
            "disk or a broken copy); use another copy, or best.pt / last.pt of the same run"
        )


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a reslab checkpoint with weights_only=True: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    try:
        ckpt = safe_torch_load(path, map_location=map_location)
    except UserError:  # a TorchScript export: already one line saying what to pass instead
        raise
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be loaded safely; truncated, or not a reslab checkpoint "
            f"({torch_load_failure(e)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "reslab":
        raise CheckpointError(
            f"{path}: not a reslab checkpoint (no 'format': 'reslab' entry); for other weights "
            "files use --weights FILE"
        )
    check_checkpoint_version(ckpt, path)
    check_digest(ckpt, path)
    return ckpt


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _host_bytes(t: torch.Tensor) -> torch.Tensor:
    # torch.load(map_location=<device>) puts the saved states wherever the run trains, and a
    # view can be strided; the generators accept only a contiguous CPU uint8 tensor.
    return t.detach().to("cpu", torch.uint8).contiguous()


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s output, whatever device the checkpoint was loaded onto."""
    torch.set_rng_state(_host_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the saving process; a machine with fewer GPUs restores its own.
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_host_bytes(s), i)
