"""The recipes and the CPU kernels' sources ship inside the wheel: an installed reslab (no source
tree beside it) lists and loads the recipes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_wheel_carries_and_loads_every_recipe(tmp_path: Path) -> None:
    # The environment's own setuptools when it is new enough (no index needed), else pip's
    # isolated build fetches the one pyproject.toml asks for.
    try:
        import setuptools

        isolation = (
            [] if int(setuptools.__version__.split(".")[0]) < 77 else ["--no-build-isolation"]
        )
    except ImportError:
        isolation = []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("reslab-*.whl")
    recipes = sorted(p.name for p in (ROOT / "src" / "reslab" / "configs").glob("*.yaml"))
    assert "cifar10-paper.yaml" in recipes
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")  # a pure-Python wheel installs by unpacking
        shipped = sorted(Path(n).name for n in z.namelist() if n.startswith("reslab/configs/"))
        kernels = sorted(
            Path(n).name for n in z.namelist() if n.startswith("reslab/models/kernels/")
        )
    assert shipped == recipes
    # the CPU kernels' sources, headers included: built on first use from the installed package
    assert kernels == sorted(p.name for p in (ROOT / "src/reslab/models/kernels").iterdir())
    assert "amx.h" in kernels
    code = (
        "import reslab, sys; from reslab.engine.config import list_recipes, load_recipe; "
        "print(reslab.__file__); print(list_recipes()); "
        "print(load_recipe('cifar10-paper').milestones)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    where, listed, milestones = out.splitlines()
    assert where.startswith(str(tmp_path / "site"))  # the unpacked wheel, not the source tree
    assert listed == str(sorted(r[: -len(".yaml")] for r in recipes))
    assert milestones == "[32000, 48000]"
