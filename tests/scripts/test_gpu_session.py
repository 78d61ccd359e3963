"""scripts/gpu_session.sh, the prepared GPU session, run end to end on the CPU at the smoke budget:
the data split into parts that fit a 64 MiB transfer, checked, reassembled, Table 6 trained and
packed, so that a session lent a GPU does not spend its minutes on a broken script."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_session.sh"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_pack_then_table6_on_cpu(cifar_root: Path, tmp_path: Path) -> None:
    gd = tmp_path / "gpudata"
    env = {**os.environ, "GPUDATA": str(gd), "RESULTS": str(tmp_path / "results"),
           "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "out"), "PY": sys.executable,
           "DEVICE": "cpu", "BUDGET": "smoke", "MODE": "none", "JOBS": "1", "TL": "600"}  # fmt: skip
    r = _run(env, "pack", str(cifar_root))
    assert r.returncode == 0, r.stderr
    for part, files in {"p1": 2, "p2": 2, "p3": 4}.items():  # p3: batch 5, test, meta, sums
        sizes = [f.stat().st_size for f in (gd / part).iterdir()]
        assert len(sizes) == files and sum(sizes) < 62 * 2**20  # + the repo, under 64 MiB
    r = _run(env, "table6")
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "out" / "table6.log").read_text()
    assert "--only resnet20-s0,resnet32-s0" in log and "report:" in log
    with tarfile.open(tmp_path / "out" / "table6-smoke.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("results/table6-smoke/REPORT.md") for n in names)
    assert any(n.endswith("results/table6-smoke/table6.png") for n in names)
    # Each run's metrics: in its RUN_DIR and as the report's committed copy in records/.
    assert sum(n.endswith("/metrics.jsonl") and "/records/" not in n for n in names) == 2
    assert sum(n.endswith("/metrics.jsonl") and "/records/" in n for n in names) == 2
    assert not any(n.endswith(".pt") for n in names)  # checkpoints stay on the machine
    # A part damaged in transfer is refused before anything trains.
    sums = gd / "p3" / "SHA256SUMS"
    sums.write_text(sums.read_text().replace("data_batch_2", "data_batch_1", 1))
    r = _run(env, "table6")
    assert r.returncode == 1 and "do not match" in r.stderr
