"""Weights from elsewhere: formats detected, outputs identical, mismatches and unsafe files refused."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.errors import CheckpointError
from reslab.models.weights import (
    CIFAR10_CLASSES,
    CIFAR10_PROJECT_PREPROCESS,
    IMAGENET_MEAN,
    UnsafeWeightsError,
    WeightsError,
    load_weights,
    model_from_weights,
    read_weights,
    save_safetensors,
)

tv_models = pytest.importorskip("torchvision.models")


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-5)


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    # Fresh BNs are identities; random statistics make a key mix-up show in the outputs.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dict_detected_and_identical(tmp_path: Path, depth: int) -> None:
    torch.manual_seed(depth)
    ref = _randomize_bn(getattr(tv_models, f"resnet{depth}")(weights=None), depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(ref.state_dict(), path)
    model, info = model_from_weights(path)
    assert info.format == "torchvision" and info.model_name == f"resnet{depth}"
    assert info.preprocess["mean"] == list(IMAGENET_MEAN) and info.preprocess["input_size"] == 224
    assert len(info.classes) == 1000
    if depth == 50:
        assert info.model_options == {"stride_in_3x3": True}
        assert any("v1.5" in n for n in info.notes)
    _same_outputs(model, ref, torch.randn(2, 3, 64, 64))


def test_v1_model_warns_on_torchvision_file(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(tv_models.resnet50(weights=None).state_dict(), path)
    with pytest.warns(UserWarning, match="stride_in_3x3"):
        load_weights(reslab.create_model("resnet50"), path)  # paper v1: stride on the 1x1


def test_dataparallel_prefix_and_new_head_size(tmp_path: Path) -> None:
    src = reslab.create_model("resnet18", num_classes=7)
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    model, info = model_from_weights(path)
    assert info.model_options["num_classes"] == 7 and info.classes is None
    assert any("module." in n for n in info.notes)
    _same_outputs(model, src, torch.randn(1, 3, 64, 64))


class _TheirBlock(nn.Module):
    """pytorch_resnet_cifar10's BasicBlock as their README describes it (option A: subsample and
    pad planes//4 zero channels on each side), written here so the key mapping meets a reference."""

    def __init__(self, inp: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or inp != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class _TheirResNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        inp, stages = 16, []
        for i, planes in enumerate((16, 32, 64)):
            stages.append(
                nn.Sequential(*[_TheirBlock(inp if j == 0 else planes, planes, 2 if i and not j
                                            else 1) for j in range(n)])
            )  # fmt: skip
            inp = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(out, out.size(3)).flatten(1))


def _their_th_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    theirs = _randomize_bn(_TheirResNet(3), 1).eval()  # resnet20
    # Their checkpoints come from DataParallel and older torch: `module.` keys, no
    # num_batches_tracked buffers.
    sd = {"module." + k: v for k, v in theirs.state_dict().items() if "num_batches" not in k}
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save({"state_dict": sd, "best_prec1": 91.0}, path)
    return path, theirs


def _normalize(x_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - m) / s


def test_pytorch_resnet_cifar10_checkpoint(tmp_path: Path, cifar_test_images) -> None:
    path, theirs = _their_th_file(tmp_path)
    model, info = model_from_weights(path)
    assert info.format == "pytorch_resnet_cifar10" and info.model_name == "resnet20"
    assert info.extra["best_prec1"] == 91.0 and info.classes == CIFAR10_CLASSES
    pre = info.preprocess
    assert (pre["kind"], pre["mode"], pre["input_size"]) == ("cifar", "per_channel", 32)
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    images, _ = cifar_test_images
    x = _normalize(images[:16], pre["mean"], pre["std"])
    _same_outputs(model, theirs, x)
    # The same file into a model the caller built.
    ours = reslab.create_model("resnet20")
    assert load_weights(ours, path).format == "pytorch_resnet_cifar10"
    _same_outputs(ours, theirs, x)


def test_safetensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    src = _randomize_bn(reslab.create_model("resnet20"), 3)
    mean_img = torch.rand(3, 32, 32)
    pre = {"kind": "cifar", "input_size": 32, "resize": None, "mode": "per_pixel",
           "mean": mean_img, "std": [1.0, 1.0, 1.0]}  # fmt: skip
    path = save_safetensors(
        src, tmp_path / "r20.safetensors", model_name="resnet20", model_options={"shortcut": "A"},
        preprocess=pre, classes=CIFAR10_CLASSES,
    )  # fmt: skip
    model, info = model_from_weights(path)
    assert (info.format, info.model_name, info.model_options) == (
        "safetensors", "resnet20", {"shortcut": "A"}
    )  # fmt: skip
    torch.testing.assert_close(info.preprocess["mean"], mean_img)
    assert info.classes == CIFAR10_CLASSES
    _same_outputs(model, src, torch.randn(2, 3, 32, 32))


def test_foreign_safetensors_judged_by_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tv_models.resnet18(weights=None)
    path = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, info = model_from_weights(path)
    assert info.model_name == "resnet18" and info.format == "safetensors"
    _same_outputs(model, src, torch.randn(1, 3, 64, 64))


def test_reslab_checkpoint(tmp_path: Path) -> None:
    src = reslab.create_model("resnet32", num_classes=4)
    ckpt = {"format": "reslab", "version": 1, "model_name": "resnet32",
            "model_options": {"num_classes": 4}, "model": src.state_dict(),
            "preprocess": {"kind": "cifar", "input_size": 32, "resize": None,
                           "mode": "per_channel", "mean": [0.5] * 3, "std": [1.0] * 3},
            "classes": ["a", "b", "c", "d"], "step": 12, "config": {"lr": 0.1}}  # fmt: skip
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    model, info = model_from_weights(path)
    assert info.format == "reslab" and info.classes == ["a", "b", "c", "d"]
    assert info.extra["step"] == 12
    _same_outputs(model, src, torch.randn(2, 3, 32, 32))
    torch.save({**ckpt, "version": 99}, path)  # another layout: refused as in resume and eval
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint format version 99"):
        model_from_weights(path)


def test_mismatches_are_listed_never_partial(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    torch.save(reslab.create_model("resnet20").state_dict(), path)
    target = reslab.create_model("resnet32")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        load_weights(target, path)
    msg = str(e.value)
    assert str(path) in msg and "resnet20" in msg and "resnet32" in msg
    assert "layer1.3.conv1.weight" in msg  # a block resnet32 has and resnet20 lacks
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"
    with pytest.raises(WeightsError, match=r"fc.weight: file \[10, 64\] vs model \[100, 64\]"):
        load_weights(reslab.create_model("resnet20", num_classes=100), path)
    # strict=False loads what fits and says what it skipped.
    head = reslab.create_model("resnet20", num_classes=3)
    with pytest.warns(UserWarning, match="fc.weight"):
        info = load_weights(head, path, strict=False)
    assert {m.split(":")[0] for m in info.mismatched} == {"fc.weight", "fc.bias"}


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(reslab.create_model("resnet20").state_dict(), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.pt .*truncated or corrupt"):
        read_weights(cut)
    st = save_safetensors(
        reslab.create_model("resnet20"), tmp_path / "m.safetensors", model_name="resnet20",
        model_options={}, preprocess=None, classes=None,
    )  # fmt: skip
    st_cut = tmp_path / "cut.safetensors"
    st_cut.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=r"cut\.safetensors"):
        read_weights(st_cut)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        read_weights(tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list\.pt: file holds a list"):
        read_weights(tmp_path / "list.pt")


class _Payload:
    """Unpickling this would create a marker file: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("layout", ["zip", "legacy", "plain_pickle"])
def test_code_in_a_pickle_never_runs(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    obj = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Payload(marker)}
    if layout == "plain_pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=layout == "zip")
    # Sanity: a full unpickle really would run the payload.
    if layout == "plain_pickle":
        probe = tmp_path / "probe"
        pickle.loads(pickle.dumps(_Payload(probe)))
        assert probe.exists()
    # pickle.dump's own files are named as such; torch.save's say what the safe loader met.
    said = r"plain Python pickle" if layout == "plain_pickle" else r"weights_only=True"
    with pytest.raises(UnsafeWeightsError, match=rf"evil\.pth.*{said}"):
        read_weights(path)
    with pytest.raises(UnsafeWeightsError):
        model_from_weights(path, model_name="resnet20")
    assert not marker.exists()


def test_head_reinit_for_fine_tuning(tmp_path: Path) -> None:
    src = tv_models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = reslab.create_model("resnet18", num_classes=5)
    fc_before = model.fc.weight.clone()
    info = load_weights(model, path, head="reinit")
    assert torch.equal(model.fc.weight, fc_before) and info.classes is None
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv3\.weight"):  # the backbone must fit
        load_weights(reslab.create_model("resnet50", num_classes=5), path, head="reinit")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("model_options", [1, 2], "its metadata cannot be read (TypeError"),
        ("classes", 7, "classes is int 7, not a list of names"),
        ("preprocess", "abc", "preprocess is a str, not a mapping"),
        (
            "preprocess",
            {"mode": "per_channel", "std": [1, 1, 1]},
            "preprocess is damaged (KeyError",
        ),
        ("preprocess", {"mean": [0.5, 0.5], "std": [1, 1, 1]}, "preprocess is damaged"),
        ("preprocess", {"mean": [0.5] * 3, "input_size": 10**6}, "input_size 1000000"),
        ("preprocess", {"mean": [0.5] * 3, "std": [0, 0, 0]}, "is not 3 positive numbers"),
    ],
)
def test_metadata_of_the_wrong_type_is_one_error_naming_the_file(
    tmp_path: Path, field: str, value: object, needle: str
) -> None:
    """A checkpoint whose metadata a hand or a bug got wrong: refused when read, not a
    TypeError (or a terabyte allocation) deep inside predict, export or eval."""
    from reslab.models.weight_formats import WeightsError, read_weights

    good = {"format": "reslab", "version": 1, "model_name": "resnet20", "model_options": {},
            "model": reslab.create_model("resnet20").state_dict(), "classes": list("abcdefghij"),
            "preprocess": {"kind": "cifar", "input_size": 32, "mode": "per_channel",
                           "mean": [0.5] * 3, "std": [0.25] * 3}}  # fmt: skip
    path = tmp_path / "ck.pt"
    torch.save(good, path)
    read_weights(path)  # the good one reads
    torch.save({**good, field: value}, path)
    with pytest.raises(WeightsError, match=re.escape(needle)) as e:
        read_weights(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_weights_holding_nan_are_refused(tmp_path: Path) -> None:
    from reslab.models.weight_formats import WeightsError

    sd = reslab.create_model("resnet20").state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"1 tensors hold nan or inf \(e\.g\. layer2\.0\.conv1"):
        model_from_weights(path, model_name="resnet20")


@pytest.mark.parametrize(
    ("dtype", "ok"),
    [(torch.float16, True), (torch.bfloat16, True), (torch.float64, True), (torch.bool, False),
     (torch.int8, False), (torch.complex64, False), (torch.float8_e4m3fn, False)],
)  # fmt: skip
def test_safetensors_of_a_type_weights_cannot_have_are_refused(
    tmp_path: Path, dtype: torch.dtype, ok: bool
) -> None:
    """A cast from bool, int8, fp8 or complex would load numbers that are not the weights."""
    from safetensors.torch import save_file

    from reslab.models.weight_formats import WeightsError

    model = reslab.create_model("resnet20")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"].to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    if ok:
        loaded, _ = model_from_weights(path, model_name="resnet20")
        want = sd["layer2.0.conv1.weight"].float()
        assert torch.equal(loaded.state_dict()["layer2.0.conv1.weight"], want)
        return
    with pytest.raises(
        WeightsError, match=r"1 tensors are stored as a type .*layer2\.0\.conv1"
    ) as e:
        model_from_weights(path, model_name="resnet20")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("options", "classes", "pre", "needle"),
    [
        ({}, list("abcdefghijk"), None, "names 11 classes but the model has 10 outputs"),
        ({}, [*"abcdefghi", "a"], None, "classes names 'a' more than once"),
        ({"residual": "no"}, None, None, "model_options.residual must be true or false, got 'no'"),
        ({"num_classes": 0}, None, None, "model_options.num_classes must be a whole number in 1.."),
        ({"widen": 2}, None, None, "model_options.widen: no model takes this option"),
        ({}, None, {"input_size": 32.5}, "preprocess input_size is 32.5, not a whole number"),
        ({}, None, {"square": "yes"}, "preprocess square is 'yes', not true or false"),
    ],
)  # fmt: skip
def test_inconsistent_reslab_safetensors_metadata_is_refused(
    tmp_path: Path, options: dict, classes: list[str] | None, pre: dict | None, needle: str
) -> None:
    """Metadata that does not describe the model: predict had printed names mixed with bare
    indices, duplicate names, a plain net as a residual one (any string is true), a truncated
    input size."""
    pre = {"kind": "cifar", "input_size": 32, "resize": None, "mode": "per_channel",
           "mean": [0.5] * 3, "std": [0.25] * 3, **(pre or {})}  # fmt: skip
    path = save_safetensors(reslab.create_model("resnet20"), tmp_path / "w.safetensors",
                            model_name="resnet20", model_options=options, preprocess=pre,
                            classes=classes)  # fmt: skip
    with pytest.raises(WeightsError, match=re.escape(needle)) as e:
        model_from_weights(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_files_reslab_writes_still_load_with_their_metadata(tmp_path: Path) -> None:
    """The checks above pass what reslab writes: boolean and integer options, a whole-number
    input size, one name per output; torchvision's 1000 names; a pytorch_resnet_cifar10 file
    of another class count loads without CIFAR-10's names."""
    src = reslab.create_model("plain20", num_classes=4)
    path = save_safetensors(src, tmp_path / "p.safetensors", model_name="plain20",
                            model_options={"residual": False, "num_classes": 4},
                            preprocess=dict(CIFAR10_PROJECT_PREPROCESS), classes=list("abcd"))  # fmt: skip
    _, info = model_from_weights(path)
    assert info.classes == list("abcd") and info.model_options["residual"] is False
    tv = tmp_path / "tv.pth"
    torch.save(tv_models.resnet18(weights=None).state_dict(), tv)
    _, info = model_from_weights(tv)
    assert info.format == "torchvision" and len(info.classes or []) in (0, 1000)
    c100 = reslab.create_model("resnet20", num_classes=100).state_dict()
    th = tmp_path / "r20.th"
    torch.save({"state_dict": {"module." + k.replace("fc.", "linear."): v
                               for k, v in c100.items()}, "best_prec1": 70.0}, th)  # fmt: skip
    _, info = model_from_weights(th)
    assert info.format == "pytorch_resnet_cifar10" and info.classes is None


def test_a_torchscript_export_is_named_as_such_wherever_weights_are_read(tmp_path: Path) -> None:
    """torch.load(weights_only=True) only said RuntimeError (after a warning) for reslab's own
    TorchScript export; the archive is recognised from its zip listing, nothing unpickled."""
    from reslab.errors import TorchScriptFileError, is_torchscript_archive
    from reslab.export import export_model
    from reslab.runtime.checkpoint import load_checkpoint

    model = reslab.create_model("resnet20").eval()
    ts = export_model(model, tmp_path / "m.pt", format="torchscript", input_size=32,
                      model_name="resnet20", model_options={}, classes=CIFAR10_CLASSES)  # fmt: skip
    ckpt = tmp_path / "sd.pt"
    torch.save(model.state_dict(), ckpt)  # torch.save's zip: data.pkl, not a TorchScript one
    assert is_torchscript_archive(ts) and not is_torchscript_archive(ckpt)
    want = f"{ts} is a TorchScript export, not weights; pass the checkpoint or a safetensors file"
    for read in (read_weights, load_checkpoint):
        with pytest.raises(TorchScriptFileError) as e:
            read(ts)
        assert str(e.value).startswith(want)


def test_a_pickle_of_another_protocol_is_refused_without_torch_warnings(tmp_path: Path) -> None:
    """torch warned in two lines ('Detected pickle protocol 4 ...') before reslab's one."""
    import warnings

    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(WeightsError, match=re.escape(str(path))) as e:
            read_weights(path)
    assert [str(w.message) for w in seen] == []
    # Not "needs more than tensors (Unsupported operand 149)": it is another kind of file.
    assert "a plain Python pickle (protocol 4), not a file torch.save" in str(e.value)
    # torch.save's own non-zip format at protocol 4 is not called a plain pickle.
    legacy = tmp_path / "legacy4.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False,
               pickle_protocol=4)  # fmt: skip
    said = re.escape("torch.save's old non-zip format written with pickle protocol 4")
    with pytest.raises(WeightsError, match=said):
        read_weights(legacy)


def test_metadata_that_is_not_plain_data_is_named(tmp_path: Path) -> None:
    """json's "Object of type Tensor is not JSON serializable" had named neither the argument
    nor the file (helper audit C, M12); nothing is written."""
    with pytest.raises(ValueError, match=r"model_options must be plain data .*/w\.safetensors"):
        save_safetensors(reslab.create_model("resnet20"), tmp_path / "w.safetensors",
                         model_name="resnet20", model_options={"x": torch.zeros(1)},
                         preprocess=None, classes=None)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
