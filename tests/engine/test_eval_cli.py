"""`reslab eval` end to end: a resnet20 trained a few steps on real CIFAR-10, saved as reslab
checkpoints, evaluated by a real `python -m reslab eval` process, alone and as an ensemble."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reslab.cli import main
from reslab.data.cifar import load_cifar, mean_image
from reslab.data.loaders import TensorLoader
from reslab.data.preprocess import Preprocess
from reslab.engine.eval_run import load_checkpoint_model
from reslab.models import create_model
from reslab.runtime.checkpoint import save_atomic

LIMIT = 120


@pytest.fixture(scope="module")
def checkpoints(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two reslab checkpoints of one short resnet20 run: after 2 and after 3 SGD steps (batch 16)."""
    torch.manual_seed(0)
    train = load_cifar(cifar_root, split="train45k")
    images, labels = train.images[:512], train.labels[:512]
    # Section 4.2's per-pixel mean: a [3, 32, 32] tensor that must survive the checkpoint.
    pre = Preprocess(mode="per_pixel", mean=mean_image(images), std=(1.0, 1.0, 1.0))
    model = create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = TensorLoader(images, labels, batch_size=16, preprocess=pre, train=True, seed=0)
    d, paths = tmp_path_factory.mktemp("ckpt"), []
    for step, (x, y) in enumerate(loader, 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (2, 3):
            ckpt = {
                "format": "reslab", "version": 1, "model_name": "resnet20", "model_options": {},
                "model": model.state_dict(), "preprocess": pre.to_dict(),
                "classes": train.classes, "step": step, "config": {"model": "resnet20"},
            }  # fmt: skip
            (d / f"run{step}").mkdir()
            save_atomic(ckpt, d / f"run{step}" / "best.pt")  # as the trainer writes them
            paths.append(d / f"run{step}" / "best.pt")
        if step == 3:
            return paths
    raise AssertionError("the loader ended early")


def _reslab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
           "OMP_NUM_THREADS": "2"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def test_eval_cli_single_and_ensemble(
    checkpoints: list[Path], cifar_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = _reslab("eval", "--checkpoint", *map(str, checkpoints), "--data", str(cifar_root),
                   "--limit", str(LIMIT), "--out", str(out), "--batch-size", "100")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in doc["members"]] == ["resnet20 (run2/best)", "resnet20 (run3/best)"]
    assert "| ensemble |" in proc.stdout and "| resnet20 (run2/best) |" in proc.stdout
    for png in (
        "confusion-resnet20_run2_best.png",
        "confusion-resnet20_run3_best.png",
        "confusion-ensemble.png",
    ):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # The CLI's numbers equal a hand computation: normalise, forward, argmax / top-5 / counts.
    test = load_cifar(cifar_root, split="test")
    y = test.labels[:LIMIT]
    probs = []
    for path, member in zip(checkpoints, doc["members"]):
        loaded = load_checkpoint_model(path, device="cpu")
        assert loaded.preprocess.mean.shape == (3, 32, 32)  # per-pixel mean came back
        with torch.no_grad():
            p = loaded.model.eval()(loaded.preprocess.normalize(test.images[:LIMIT])).softmax(1)
        probs.append(p)
        top1 = (p.argmax(1) == y).double().mean().item()
        top5 = (p.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
        assert member["top1_error"] == pytest.approx(100 * (1 - top1))
        assert member["top5_error"] == pytest.approx(100 * (1 - top5))
        conf = torch.bincount(y * 10 + p.argmax(1), minlength=100).view(10, 10)
        assert member["confusion"] == conf.tolist()
    ens = doc["ensemble"]
    want = (probs[0] + probs[1]).argmax(1) == y
    assert ens["top1_error"] == pytest.approx(100.0 * (1 - want.double().mean().item()))
    assert ens["num_samples"] == LIMIT and sum(map(sum, ens["confusion"])) == LIMIT


def test_eval_cli_views_and_bad_files(
    checkpoints: list[Path], cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    json_out = tmp_path / "ten.json"
    code = main(["eval", "--checkpoint", str(checkpoints[0]), "--data", str(cifar_root),
                 "--limit", "30", "--views", "ten-crop", "--json", str(json_out),
                 "--out", str(tmp_path / "o"), "--precision", "bf16"])  # fmt: skip
    assert code == 0
    doc = json.loads(json_out.read_text())
    assert doc["views"] == "ten-crop" and doc["members"][0]["num_samples"] == 30
    assert doc["ensemble"] is None and (tmp_path / "o" / "confusion-resnet20_best.png").is_file()
    flip_out = tmp_path / "flip.json"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--data", str(cifar_root),
                 "--limit", "30", "--views", "flip", "--json", str(flip_out),
                 "--out", str(tmp_path / "o"), "--precision", "auto"]) == 0  # fmt: skip
    flip_doc = json.loads(flip_out.read_text())
    assert flip_doc["views"] == "flip"
    shift_out = tmp_path / "shift.json"
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--data", str(cifar_root),
                 "--limit", "30", "--views", "flip-shift", "--json", str(shift_out),
                 "--out", str(tmp_path / "o"), "--precision", "fp32"]) == 0  # fmt: skip
    shift_doc = json.loads(shift_out.read_text())
    assert shift_doc["views"] == "flip-shift" and shift_doc["members"][0]["num_samples"] == 30
    # "auto" is reported as what it resolved to, on the screen and in the JSON
    assert flip_doc["precision"] in ("bf16", "fp32")
    assert f"30 images, {flip_doc['precision']}\n" in capsys.readouterr().out
    monkeypatch.setenv("RESLAB_DATA", str(cifar_root))  # no --data: $RESLAB_DATA, as in train
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--limit", "20",
                 "--json", str(tmp_path / "env.json"), "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "env.json").read_text())["members"][0]["num_samples"] == 20

    bad = tmp_path / "truncated.pt"
    bad.write_bytes(checkpoints[0].read_bytes()[:5000])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(bad), "--data", str(cifar_root)]) == 2
    assert str(bad) in capsys.readouterr().err
    other = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, other)
    assert main(["eval", "--checkpoint", str(other), "--data", str(cifar_root)]) == 2
    assert "not a reslab checkpoint" in capsys.readouterr().err
    wrong = tmp_path / "c100"
    assert main(["eval", "--checkpoint", str(checkpoints[0]), "--data", str(wrong),
                 "--dataset", "cifar100"]) == 2  # fmt: skip
    assert "cifar-100-python" in capsys.readouterr().err


def test_one_checkpoint_error_for_every_loader() -> None:
    """eval, resume and the weights readers raise the same class: a UserError (exit 2) that
    `except RuntimeError` clauses still catch."""
    from reslab.engine import eval_run
    from reslab.errors import CheckpointError, UserError
    from reslab.runtime import checkpoint

    assert eval_run.CheckpointError is checkpoint.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, UserError) and issubclass(CheckpointError, RuntimeError)


def test_one_rule_for_the_data_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """--data (or a recipe's data) wins, then $RESLAB_DATA, then ./data: train, eval, reproduce
    and demo all call reslab.data.resolve_data_root."""
    from reslab.cli import _train_config, build_parser
    from reslab.data import resolve_data_root
    from reslab.experiments.runner import default_data

    monkeypatch.delenv("RESLAB_DATA", raising=False)
    assert resolve_data_root(None) == default_data() == "data"
    monkeypatch.setenv("RESLAB_DATA", "/env/cifar")
    assert resolve_data_root(None) == default_data() == "/env/cifar"
    assert resolve_data_root("data") == "data"  # an explicit ./data is not the env's to replace
    train = build_parser().parse_args(["train"])
    assert _train_config(train).data == "/env/cifar"
    train = build_parser().parse_args(["train", "--set", "data=data"])
    assert _train_config(train).data == "data"


def test_eval_runs_a_folded_channels_last_copy() -> None:
    from reslab.engine.eval_run import fast_eval_model

    torch.manual_seed(0)
    net = create_model("resnet20", shortcut="B").train()
    for _ in range(2):  # move the running statistics away from their initial values
        net(torch.randn(16, 3, 32, 32))
    net.eval()
    fast = fast_eval_model(net, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # caller's untouched
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)


def test_val5k_of_a_run_that_trained_on_all_50k_is_said_not_to_be_validation(
    checkpoints: list[Path], cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """cifar10-fast and the demo train on all 50k images (val_split: false): their val5k error is
    measured on images they trained on, which eval now says; a 45k run's is not flagged."""
    from reslab.runtime.checkpoint import load_checkpoint

    for val_split in (False, True):
        ckpt = load_checkpoint(checkpoints[0])
        ckpt["config"] = {"model": "resnet20", "dataset": "cifar10", "val_split": val_split}
        path = tmp_path / f"split{val_split}" / "best.pt"
        path.parent.mkdir()
        save_atomic(ckpt, path)
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(path), "--data", str(cifar_root), "--split",
                     "val5k", "--limit", "20", "--out", str(tmp_path / "o")]) == 0  # fmt: skip
        err = capsys.readouterr().err
        assert ("trained on all 50k training images (val_split: false)" in err) == (not val_split)


def test_eval_of_bare_weights_takes_normalize_as_predict_does(
    checkpoints: list[Path], cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bare state_dict says nothing of its inputs: eval names --normalize (it had advised a
    format no command writes) and takes it, as predict does; predict says when the flag is not
    used because the file has its own preprocessing."""
    model = load_checkpoint_model(checkpoints[0], device="cpu").model
    raw = tmp_path / "raw.pth"
    torch.save(model.state_dict(), raw)
    argv = ["eval", "--model", "resnet20", "--weights", str(raw), "--data", str(cifar_root),
            "--limit", "20", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert "say it with --normalize imagenet|cifar10" in capsys.readouterr().err
    assert main([*argv, "--normalize", "cifar10"]) == 0
    out, err = capsys.readouterr()
    assert "cifar10 test, center view(s), 20 images" in out and "not used" not in err
    # A checkpoint, or a weights file with its own preprocessing: the flag is not used, and
    # eval says so (as predict does).
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoints[0]),
                "--data",
                str(cifar_root),
                "--limit",
                "20",
                "--out",
                str(tmp_path / "o2"),
                "--normalize",
                "imagenet",
            ]
        )
        == 0
    )
    assert "--normalize imagenet is not used: the checkpoint says" in capsys.readouterr().err
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(img)
    assert main(["predict", "--checkpoint", str(checkpoints[0]), str(img), "--normalize",
                 "imagenet"]) == 0  # fmt: skip
    assert "--normalize imagenet is not used" in capsys.readouterr().err


def test_a_cifar_run_kept_beside_its_data_is_evaluated(
    checkpoints: list[Path], cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """DATA/cifar-10-batches-py beside DATA/runs/x: eval's default --out (runs/x/eval) is inside
    --data, which is only refused for an image folder (a PNG there would become a sample)."""
    import shutil

    (tmp_path / "cifar-10-batches-py").symlink_to(cifar_root / "cifar-10-batches-py")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    shutil.copy(checkpoints[0], run / "best.pt")
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--data", str(tmp_path),
                 "--limit", "20"]) == 0  # fmt: skip
    assert (run / "eval" / "eval.json").is_file()


def test_a_folder_ensemble_needs_one_crop_geometry(
    checkpoints: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Members of a folder ensemble share one batch of crops: a member whose test resize is
    square (AlexNet's) where the first's keeps the aspect ratio is refused in one line naming it;
    the same geometry evaluates."""
    from PIL import Image

    from reslab.data.preprocess import Preprocess
    from reslab.runtime.checkpoint import load_checkpoint

    data = tmp_path / "imgs"
    ckpt = load_checkpoint(checkpoints[0])
    for i, name in enumerate(ckpt["classes"]):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (40, 36), (20 * i, 100, 200 - 10 * i)).save(data / name / "a.png")
    paths = []
    for i, square in enumerate((False, True, False)):
        ckpt = load_checkpoint(checkpoints[i % 2])
        pre = Preprocess(kind="imagenet", input_size=32, resize=36, square=square)
        ckpt["preprocess"] = pre.to_dict()
        ckpt["config"] = {"model": "resnet20", "dataset": "folder"}
        paths.append(tmp_path / f"m{i}" / "best.pt")
        paths[-1].parent.mkdir()
        save_atomic(ckpt, paths[-1])
    argv = ["eval", "--data", str(data), "--out", str(tmp_path / "o"), "--checkpoint"]
    capsys.readouterr()
    assert main([*argv, str(paths[0]), str(paths[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m1" in err and "folder ensembles share one crop" in err
    assert main([*argv, str(paths[0]), str(paths[2])]) == 0
    assert "folder test, center view(s), 10 images" in capsys.readouterr().out
