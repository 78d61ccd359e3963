"""The command line on the card: one-process torchrun DDP on NCCL with sync-BN, `reslab eval`
and `reslab predict` on CUDA (folder evaluation from pinned memory), and `reslab reproduce
--jobs 5` sharing one card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_helpers import needs_cuda
from PIL import Image

from reslab.runtime.checkpoint import load_checkpoint

pytestmark = needs_cuda


def _run(args: list[str], timeout: float = 150, **env: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **env})  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout + r.stderr


def _train_args(root: Path, out: Path) -> list[str]:
    return ["--model", "resnet20", "--data", str(root), "--out", str(out), "--device", "cuda",
            "--iters", "20", "--eval-every", "20", "--set", "train_subset=2560",
            "--set", "eval_subset=1000", "--set", "val_split=false",
            "--set", "eval_splits=[test]"]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "reslab", "train", *_train_args(cifar_root, out), "--sync-bn"]  # fmt: skip
    _run(cmd, RESLAB_FORCE_DDP="1")  # a one-process group, DDP and SyncBatchNorm anyway
    return out


def test_one_process_torchrun_ddp_on_nccl_with_sync_bn(ddp_run: Path) -> None:
    ckpt = load_checkpoint(ddp_run / "last.pt")
    assert ckpt["step"] == 20 and ckpt["world_size"] == 1
    assert json.loads((ddp_run / "final.json").read_text())["iter"] == 20


def test_eval_and_predict_on_cuda(ddp_run: Path, cifar_root: Path, tmp_path: Path) -> None:
    ckpt = str(ddp_run / "last.pt")
    report = tmp_path / "eval.json"
    _run([sys.executable, "-m", "reslab", "eval", "--checkpoint", ckpt, "--data", str(cifar_root),
          "--device", "cuda", "--limit", "1000", "--json", str(report),
          "--out", str(tmp_path / "eval")])  # fmt: skip
    assert report.is_file()
    # A small folder of real PNGs: folder evaluation and predict on the card.
    from reslab.data.cifar import load_cifar

    test = load_cifar(cifar_root, split="test")
    for i in range(8):
        d = tmp_path / "folder" / test.classes[int(test.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    out = _run([sys.executable, "-m", "reslab", "predict", str(tmp_path / "folder"),
                "--checkpoint", ckpt, "--device", "cuda", "--json"])  # fmt: skip
    assert out.count(".png") >= 8


def test_folder_evaluation_batches_come_from_pinned_memory(
    cifar_root: Path, tmp_path: Path
) -> None:
    from reslab.data.preprocess import Preprocess
    from reslab.engine.eval_run import folder_batches

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.png")
    pre = Preprocess(kind="imagenet", input_size=32, resize=36)
    loader, classes = folder_batches(tmp_path, pre=pre, views="center", scales=None,
                                     labels_file=None, classes=None, limit=None, batch_size=4,
                                     workers=1, pin_memory=True)  # fmt: skip
    x, _ = next(iter(loader))
    assert classes == ["a", "b"] and x.is_pinned()


def test_reproduce_jobs_5_share_one_card(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "t6"
    _run([sys.executable, "-m", "reslab", "reproduce", "table6", "--budget", "smoke",
          "--seeds", "3", "--jobs", "5", "--device", "cuda", "--data", str(cifar_root),
          "--out", str(out), "--quiet"], timeout=300)  # fmt: skip
    assert (out / "REPORT.md").is_file()
    runs = sorted((out / "runs" / "smoke").iterdir())
    assert len(runs) == 6 and all((r / "final.json").is_file() for r in runs)
    n = torch.cuda.device_count()
    devices = {(r / "config.yaml").read_text().split("device: ")[-1].split()[0] for r in runs}
    assert devices <= {f"cuda:{i}" for i in range(n)}, devices
