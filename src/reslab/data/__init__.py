"""Data sets, preprocessing and loaders."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_data_root(data: str | Path | None) -> str:
    """The data directory every command uses: `data` when given (--data, a recipe, --set),
    else $RESLAB_DATA, else ./data."""
    return str(data) if data else os.environ.get("RESLAB_DATA") or "data"
