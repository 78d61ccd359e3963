"""scripts/gpu_check.sh, issue 14's one-call GPU proof, run on the CPU at tiny settings so that a
session lent a GPU does not spend its minutes on a broken script: every step runs, the results
land in at most 8 files (the device tool returns no more), and the deadline is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _run(tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OUT": str(tmp / "out"), "RESLAB_DATA": str(tmp / "data"),
            "PY": sys.executable, "DEVICE": "cpu", "DEPTHS": "20,32", "STEPS": "1",
            "WARMUP": "0", "BATCH": "4", "SYNTH_PER_BATCH": "20",
            "BENCH_ARGS": "--images 64 --peak-seconds 0.2", "MPS": "1", **env}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _check(out: Path, names: tuple[str, ...]) -> list[dict]:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    steps = (out / "steps.txt").read_text()
    for name in names:
        assert f"{name}: exit 0" in steps, steps
    assert "bench-compile" not in steps  # COMPILE_PATHS empty: not run
    return [json.loads(ln) for ln in (out / "bench.jsonl").read_text().splitlines()]


def test_card_tests_and_eager_bench_steps(tmp_path: Path) -> None:
    r = _run(tmp_path, EAGER_PATHS="eager,graph", COMPILE_PATHS="", SHARED="0", DEPTHS="20")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _check(tmp_path / "out", ("card", "cuda-tests", "bench-eager"))
    # The synthetic CIFAR-shaped set the cuda tests read, written on the machine itself.
    data = tmp_path / "data" / "cifar-10-batches-py"
    assert {p.name for p in data.iterdir()} >= {"data_batch_5", "test_batch", "batches.meta"}
    assert "skipped" in (tmp_path / "out" / "cuda-tests.txt").read_text()  # no CUDA: skipped
    (peak,) = [r for r in rows if "peak_bf16_tflops" in r]
    (eager,) = [r for r in rows if r.get("path") == "eager"]
    assert peak["peak_bf16_tflops"] > 0 and eager["net"] == "resnet20"
    assert eager["fraction_of_bf16_peak"] > 0 and eager["img_per_s"] > 0
    # The CUDA-only whole-step graph fails on a CPU as one recorded row, not a crash.
    assert any(r.get("path") == "graph" and "needs CUDA" in r["error"] for r in rows)


@pytest.mark.slow  # two spawned trainers: ~30-50 s on the loaded 2-core machine
def test_every_step_runs_and_leaves_at_most_eight_files(tmp_path: Path) -> None:
    r = _run(tmp_path, EAGER_PATHS="eager,graph", COMPILE_PATHS="", TESTS_BUDGET="60")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    steps = (out / "steps.txt").read_text()
    for name in ("card", "cuda-tests", "bench-eager", "bench-shared"):
        assert f"{name}: exit 0" in steps, steps
    assert "bench-compile" not in steps  # COMPILE_PATHS empty: not run
    # The synthetic CIFAR-shaped set the cuda tests read, written on the machine itself.
    data = tmp_path / "data" / "cifar-10-batches-py"
    assert {p.name for p in data.iterdir()} >= {"data_batch_5", "test_batch", "batches.meta"}
    assert "skipped" in (out / "cuda-tests.txt").read_text()  # no CUDA here: skipped cleanly
    rows = [json.loads(ln) for ln in (out / "bench.jsonl").read_text().splitlines()]
    peak = [r for r in rows if "peak_bf16_tflops" in r]
    eager = {r["net"]: r for r in rows if r.get("path") == "eager" and "concurrent" not in r}
    shared = [r for r in rows if r.get("concurrent") == 2]
    assert len(peak) == 2 and all(p["peak_bf16_tflops"] > 0 for p in peak)
    assert set(eager) == {"resnet20", "resnet32"}
    assert all(r["fraction_of_bf16_peak"] > 0 and r["img_per_s"] > 0 for r in eager.values())
    assert {r["net"] for r in shared} == {"resnet20", "resnet32"}
    # The CUDA-only whole-step graph fails on a CPU as one recorded row, not a crash.
    assert any(r.get("path") == "graph" and "needs CUDA" in r["error"] for r in rows)
    assert "CUDA MPS not available" in (out / "bench-shared.txt").read_text()  # not fatal


def test_a_spent_deadline_skips_steps_and_still_reports(tmp_path: Path) -> None:
    r = _run(tmp_path, DEADLINE="5")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert steps.count("skipped") == 5 and "done in" in steps, steps


def test_a_dead_concurrent_worker_is_an_error_not_a_hang() -> None:
    import multiprocessing as mp

    sys.path.insert(0, str(SCRIPT.parents[1] / "benchmarks"))
    import bench_gpu

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    q.put((20, 0.01, None))  # ResNet-20 reported; ResNet-56's process dies without a word
    procs = {20: ctx.Process(target=os._exit, args=(0,)),
             56: ctx.Process(target=os._exit, args=(3,))}  # fmt: skip
    for p in procs.values():
        p.start()
    with pytest.raises(RuntimeError, match=r"ResNet-56 \(exit code 3\)"):
        bench_gpu._wave_results(procs, q, timeout=60)
    q2 = ctx.Queue()
    q2.put((56, None, "OutOfMemoryError: CUDA out of memory"))
    with pytest.raises(RuntimeError, match="ResNet-56 failed: OutOfMemoryError"):
        bench_gpu._wave_results({56: procs[56]}, q2, timeout=60)
