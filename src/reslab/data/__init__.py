"""Data sets, preprocessing and loaders."""

import os
from pathlib import Path


def resolve_data_root(data: str | Path | None) -> str:
    """The data directory of every command: `data` if given, else $RESLAB_DATA, else ./data."""
    return str(data) if data else os.environ.get("RESLAB_DATA") or "data"
