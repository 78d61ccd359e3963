"""Load weights from reslab, torchvision, pytorch_resnet_cifar10 and safetensors files safely.

Every file is read without running code: safetensors directly, anything pickled only through
``torch.load(weights_only=True, map_location="cpu")``. What the file is gets detected from its
contents, and a file that does not fit the model is an error that lists what differs.

v1 vs v1.5: the paper's ResNet-50/101/152 put the bottleneck's stride on the first 1x1 conv,
torchvision's on the 3x3. The weight shapes are identical, so no state_dict can tell them apart.
A bare state_dict in the torchvision layout is taken to be torchvision's (v1.5,
``stride_in_3x3=True``), which is where nearly all such files come from; for v1 weights build the
model with ``stride_in_3x3=False`` yourself and use :func:`load_weights`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.models.arch import describe
from reslab.models.registry import classifier_name
from reslab.models.weight_formats import (
    _MEAN_TENSOR_KEY,
    CIFAR10_CLASSES,
    CIFAR10_PROJECT_PREPROCESS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_PREPROCESS,
    StateDict,
    UnsafeWeightsError,
    WeightsError,
    check_classes_fit,
    read_weights,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_PROJECT_PREPROCESS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_PREPROCESS",
    "UnsafeWeightsError",
    "WeightsError",
    "WeightsInfo",
    "load_weights",
    "model_from_weights",
    "read_weights",
    "save_safetensors",
]


@dataclass
class WeightsInfo:
    """What a weights file held and how it was loaded."""

    path: Path
    format: str  # reslab | safetensors | torchvision | pytorch_resnet_cifar10 | state_dict
    model_name: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    classes: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. best_prec1, step
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # only non-empty with strict=False
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- loading


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, head: str = "load"
) -> WeightsInfo:
    """Load a weights file of any supported format into `model`.

    strict=True (default): every key and shape must match, else a WeightsError lists what
    differs. strict=False loads the tensors that fit and warns naming the ones that do not; the
    lists are in the returned WeightsInfo. head="reinit" (fine-tuning on new classes) leaves the
    model's classifier (models.classifier_name) as initialised and ignores the file's; everything else
    is still checked as `strict` says.
    """
    if head not in ("load", "reinit"):
        raise ValueError(f"head must be 'load' or 'reinit', got {head!r}")
    sd, meta = read_weights(path)
    if head == "reinit":
        prefix = classifier_name(model) + "."
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        meta = {**meta, "classes": None, "notes": [*meta["notes"], f"head {prefix}* not loaded"]}
        return _load_state(model, sd, meta, Path(path), strict=strict, skip=prefix)
    return _load_state(model, sd, meta, Path(path), strict=strict)


def model_from_weights(
    path: str | os.PathLike, *, model_name: str | None = None, strict: bool = True, **options: Any
) -> tuple[nn.Module, WeightsInfo]:
    """Build the model a weights file describes (or `model_name`) and load the file into it.

    The file's own options (e.g. num_classes, torchvision's stride_in_3x3=True) apply unless
    `options` override them.
    """
    from reslab.models.registry import create_model

    path = Path(path)
    sd, meta = read_weights(path)
    name = model_name or meta["model_name"]
    if name is None:
        raise WeightsError(
            f"cannot tell which model {path} is for (format {meta['format']}); name it "
            "(--model NAME / model_name=...)"
        )
    file_opts = meta["model_options"] if name == meta["model_name"] else {}
    model = create_model(name, **{**file_opts, **options})
    info = _load_state(model, sd, meta, path, strict=strict)
    info.model_name, info.model_options = name, {**file_opts, **options}
    return model, info


def _load_state(
    model: nn.Module,
    sd: StateDict,
    meta: dict[str, Any],
    path: Path,
    *,
    strict: bool,
    skip: str | None = None,
) -> WeightsInfo:
    expected = model.state_dict()
    if skip is not None:  # keys the caller keeps as initialised (a new head)
        expected = {k: v for k, v in expected.items() if not k.startswith(skip)}
    sd = dict(sd)
    for k, v in expected.items():
        # Files from older torch have no BN num_batches_tracked; it only matters for momentum=None.
        stem = k[: -len("num_batches_tracked")]
        if k.endswith("num_batches_tracked") and k not in sd and stem + "running_mean" in sd:
            sd[k] = torch.zeros_like(v)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: file {list(sd[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    info = WeightsInfo(
        path=path,
        format=meta["format"],
        model_name=meta["model_name"],
        model_options=dict(meta["model_options"]),
        preprocess=meta["preprocess"],
        classes=meta["classes"],
        extra=dict(meta["extra"]),
        notes=list(meta["notes"]),
    )
    if missing or unexpected or mismatched:
        report = _diff_report(path, missing, unexpected, mismatched, sd, expected)
        if strict:
            raise WeightsError(report)
        warnings.warn(f"partial load (strict=False): {report}", stacklevel=3)
        info.missing, info.unexpected, info.mismatched = missing, unexpected, mismatched
        bad = {m.split(":")[0] for m in mismatched}
        sd = {k: v for k, v in sd.items() if k in expected and k not in bad}
        if classifier_name(model) + ".weight" not in sd:  # the file's class names went with it
            info.classes = None
    wrong = [
        f"{k} ({sd[k].dtype})" for k, v in expected.items() if k in sd and not _dtype_fits(sd[k], v)
    ]
    if wrong:  # load_state_dict would cast bool/int8/fp8/complex to float without a word
        raise WeightsError(f"{path}: {len(wrong)} tensors are stored as a type these weights cannot "
                           f"have (e.g. {wrong[0]}); save them as float32, float16 or bfloat16 "
                           "(quantized weights are not supported)")  # fmt: skip
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged run's weights: every prediction from them would be nan
        raise WeightsError(f"{path}: {len(bad)} tensors hold nan or inf (e.g. {bad[0]}); use a "
                           "checkpoint from before the run diverged")  # fmt: skip
    check_classes_fit(info.classes, model, path)
    _check_stride(model, meta, info)
    # sd now holds exactly the checked keys: what is left out (a new head, or what strict=False
    # skipped with a warning) keeps its initial values.
    model.load_state_dict(sd, strict=False)
    return info


_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _dtype_fits(stored: torch.Tensor, wanted: torch.Tensor) -> bool:
    # Weights and BN statistics may be any of the usual float widths (the cast is exact or a
    # rounding); a counter (BN num_batches_tracked) any integer. fp8 is a quantization format
    # with scales that a plain cast ignores, so it is refused with bool and complex.
    if wanted.is_floating_point():
        return stored.dtype in _FLOAT_TYPES
    if wanted.dtype in _INT_TYPES:
        return stored.dtype in _INT_TYPES
    return stored.dtype == wanted.dtype


def _diff_report(
    path: Path,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    sd: StateDict,
    expected: StateDict,
) -> str:
    def show(xs: list[str]) -> str:
        return ", ".join(xs[:6]) + (f", ... ({len(xs) - 6} more)" if len(xs) > 6 else "")

    lines = [f"{path} does not fit this model (file: {describe(sd)}; model: {describe(expected)}):"]
    if missing:
        lines.append(f"  {len(missing)} keys the model needs are not in the file: {show(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} keys in the file the model lacks: {show(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shapes differ: {show(mismatched)}")
    return "\n".join(lines)


def _check_stride(model: nn.Module, meta: dict[str, Any], info: WeightsInfo) -> None:
    from reslab.models.blocks import Bottleneck

    want = meta["model_options"].get("stride_in_3x3")
    has = getattr(model, "opts", {}).get("stride_in_3x3")
    if want is None or has is None or want == has:
        return
    if any(isinstance(m, Bottleneck) for m in model.modules()):
        msg = (
            f"{info.path} ({meta['format']}) is for stride_in_3x3={want} but the model was built "
            f"with stride_in_3x3={has}; the weights load (same shapes) but outputs will differ "
            "unless you know the file is the other variant"
        )
        info.notes.append(msg)
        warnings.warn(msg, stacklevel=4)


# ----------------------------------------------------------------------------------- saving


def save_safetensors(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_name: str,
    model_options: dict[str, Any],
    preprocess: dict[str, Any] | None,
    classes: list[str] | None,
) -> Path:
    """Write the model's weights with its name, options, preprocessing and classes as metadata.

    The write is atomic (temporary file, fsync, rename).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    pre = None if preprocess is None else dict(preprocess)
    if pre is not None and isinstance(pre.get("mean"), torch.Tensor):
        # A per-pixel mean image [3, H, W] is a tensor, not JSON: it rides as a tensor.
        tensors[_MEAN_TENSOR_KEY] = pre["mean"].detach().to("cpu", torch.float32).contiguous()
        pre["mean"] = "tensor"

    def as_json(what: str, value: Any) -> str:
        try:
            return json.dumps(value)
        except (TypeError, ValueError) as e:  # a tensor, a set, a NaN-free check's kin
            raise ValueError(f"{what} must be plain data (numbers, text, lists, mappings) to be "
                             f"written into {path}: {e}") from None  # fmt: skip

    metadata = {
        "format": "reslab",
        "model_name": model_name,
        "model_options": as_json("model_options", model_options),
        "preprocess": as_json("preprocess", pre),
        "classes": as_json("classes", classes),
    }
    from reslab.runtime.checkpoint import check_target

    tmp = check_target(path).with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
