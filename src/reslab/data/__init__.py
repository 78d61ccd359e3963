"""Data sets, preprocessing and loaders."""

import os
from pathlib import Path


def resolve_data_root(data: str | Path | None) -> str:
    """The data directory of every command: `data` if given, else $RESLAB_DATA, else ./data."""
    return str(data) if data else os.environ.get("RESLAB_DATA") or "data"


def data_root_origin(data: str | Path | None) -> str:
    """Where `resolve_data_root(data)` came from, as a message names it: the fix differs
    (a flag to change, or an environment variable the user may not remember setting)."""
    if data:
        return f"--data {data}"
    if os.environ.get("RESLAB_DATA"):
        return f"$RESLAB_DATA ({os.environ['RESLAB_DATA']})"
    return "the default --data (./data)"


def check_data_root(data: str | Path | None, *, folders: bool = True) -> None:
    """Refuse a data path that is a file, naming where it came from. Below it a file would
    surface as 'FILE/cifar-10-batches-py/test_batch: Not a directory', a path that cannot
    exist; a missing directory is left to the caller (it may be downloaded into). folders:
    whether the command also reads image folders (train, eval) or only CIFAR (demo, reproduce)."""
    root = Path(resolve_data_root(data))
    if root.exists() and not root.is_dir():
        from reslab.data.cifar import DataError

        raise DataError(
            f"{data_root_origin(data)} is a file; give the directory that holds "
            "cifar-10-batches-py"
            + (" (or the class folders of an image folder)" if folders else "")
        )
