"""Checkpoints that survive a kill at any moment and can never run code when loaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, rename over `path`.

    A reader (or a resumed run) sees either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a reslab checkpoint with weights_only=True: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "It may be truncated, or need code to unpickle, which reslab refuses to run."
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != "reslab":
        raise CheckpointError(f"{path}: not a reslab checkpoint (no 'format': 'reslab' entry)")
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
