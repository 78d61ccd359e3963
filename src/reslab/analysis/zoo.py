"""The `reslab models` table, cached so that listing the zoo does not rebuild 20 networks.

Counting builds every model on the meta device (no memory, no initialisation) and runs one
forward on meta tensors, which is exact: the hooks only read output shapes. That still costs
seconds (ResNet-1202 alone has 1,200 layers to construct), and importing torch costs more, so
the finished rows are cached per source version: a key over the bytes of the model and counting
sources plus the installed torch version. A cache hit imports neither torch nor the models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parents[1]
# The paper's ResNet-18 error (Table 2) is for option-A shortcuts; our resnet18 is built with B.
PAPER_SHORTCUT = {"resnet18": "A", "resnet34": "B"}


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reslab" / "zoo.json"


def source_key() -> str:
    """Changes whenever a model definition, the counter or torch changes."""
    h = hashlib.sha256()
    files = [*sorted((_PKG / "models").glob("*.py")), _PKG / "analysis" / "complexity.py"]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    with contextlib.suppress(metadata.PackageNotFoundError):
        h.update(metadata.version("torch").encode())
    return h.hexdigest()[:16]


def compute_rows() -> list[dict[str, Any]]:
    import torch

    from reslab.analysis.complexity import count_macs, count_params
    from reslab.models import create_model, list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        with torch.device("meta"):
            model = create_model(name)
        opts = dict(info.defaults)
        if info.family == "alexnet":
            shortcut = "-"
        elif opts.get("residual") is False:
            shortcut = "none"
        else:
            shortcut = opts.get("shortcut", "A" if info.family == "cifar" else "B")
        rows.append({
            "name": name, "family": info.family, "depth": info.depth,
            "input_size": info.input_size, "shortcut": shortcut,
            "params": count_params(model), "macs": count_macs(model, info.input_size),
            "paper_params": info.paper_params, "paper_macs": info.paper_macs,
            "paper_error": info.paper_error,
        })  # fmt: skip
    return rows


def zoo_rows(*, use_cache: bool = True) -> list[dict[str, Any]]:
    """Rows of the zoo table, from the cache when it matches the installed sources."""
    path, key = cache_path(), source_key()
    if use_cache:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["rows"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no cache, or an unreadable one: count again
    rows = compute_rows()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "rows": rows}))
        os.replace(tmp, path)  # atomic: a killed listing never leaves half a cache
    except OSError:
        pass  # a read-only home still gets its table, just not cached
    return rows
