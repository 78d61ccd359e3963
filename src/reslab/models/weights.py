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
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.models.arch import describe, infer_architecture

StateDict = dict[str, torch.Tensor]

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# pytorch_resnet_cifar10 normalises CIFAR-10 inputs with ImageNet's per-channel statistics.
CIFAR10_PROJECT_PREPROCESS = {
    "kind": "cifar", "input_size": 32, "resize": None, "mode": "per_channel",
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
}  # fmt: skip
TORCHVISION_PREPROCESS = {
    "kind": "imagenet", "input_size": 224, "resize": 256, "mode": "per_channel",
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
}  # fmt: skip
_MEAN_TENSOR_KEY = "__reslab_preprocess_mean__"  # a per-pixel mean image inside safetensors


class WeightsError(ValueError):
    """A weights file that cannot be used (unreadable, unknown layout, or not fitting)."""


class UnsafeWeightsError(WeightsError):
    """A pickled file that needs more than tensors and containers to load (it could run code)."""


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


# ----------------------------------------------------------------------------------- reading


def read_weights(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read a weights file of any supported format -> (state_dict in reslab names, meta).

    meta has keys format, model_name, model_options, preprocess, classes, extra, notes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (or is not a file)")
    if _is_safetensors(path):
        return _read_safetensors(path)
    obj = _torch_load(path)
    return _interpret(obj, path)


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only" in msg.lower() or "weights_only" in msg:
            reason = _unsafe_reason(msg)
            raise UnsafeWeightsError(
                f"refusing to load {path}: unpickling it needs more than tensors and plain "
                f"containers ({reason}), and a full unpickle could run arbitrary code. reslab "
                "loads pickled files only with torch.load(weights_only=True). If you trust the "
                "file, load it yourself and re-save just its state_dict (or save it as "
                "safetensors)."
            ) from None
        raise WeightsError(f"{path} is not a readable weights file (corrupt?): {msg}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise WeightsError(
            f"{path} is not a readable weights file (truncated or corrupt?): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _unsafe_reason(msg: str) -> str:
    # torch's message spans many lines of advice; keep the line that names the offending global.
    for line in msg.splitlines():
        s = line.strip()
        if "GLOBAL" in s or s.startswith(("WeightsUnpickler error", "Unsupported")):
            return s.rstrip(".")
    return msg.splitlines()[0].strip().rstrip(".")


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: StateDict = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightsError(
            f"{path} looks like a safetensors file but cannot be read (truncated or corrupt?): {e}"
        ) from None
    mean_img = tensors.pop(_MEAN_TENSOR_KEY, None)
    if header.get("format") != "reslab":
        # Someone else's safetensors (e.g. a hub export): judge it by its tensors.
        sd, meta = _interpret(tensors, path)
        meta["format"] = "safetensors"
        return sd, meta
    try:
        preprocess = json.loads(header.get("preprocess", "null"))
        meta = {
            "format": "safetensors",
            "model_name": header.get("model_name") or None,
            "model_options": json.loads(header.get("model_options", "{}")),
            "preprocess": preprocess,
            "classes": json.loads(header.get("classes", "null")),
            "extra": {},
            "notes": [],
        }
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: reslab metadata is not valid JSON: {e}") from None
    if preprocess is not None and mean_img is not None:
        preprocess["mean"] = mean_img
    sd, notes = _normalize_keys(tensors)
    meta["notes"] += notes
    return sd, meta


def _interpret(obj: Any, path: Path) -> tuple[StateDict, dict[str, Any]]:
    meta: dict[str, Any] = {
        "format": "state_dict", "model_name": None, "model_options": {}, "preprocess": None,
        "classes": None, "extra": {}, "notes": [],
    }  # fmt: skip
    if isinstance(obj, dict) and obj.get("format") == "reslab":
        sd, meta["notes"] = _normalize_keys(_tensor_dict(obj.get("model"), path, "'model'"))
        meta.update(
            format="reslab",
            model_name=obj.get("model_name"),
            model_options=dict(obj.get("model_options") or {}),
            preprocess=obj.get("preprocess"),
            classes=obj.get("classes"),
            extra={k: obj[k] for k in ("step", "epoch", "version") if k in obj},
        )
        return sd, meta
    if isinstance(obj, dict) and "state_dict" in obj and "best_prec1" in obj:
        # pytorch_resnet_cifar10: {'state_dict': {'module.conv1.weight', ..., 'module.linear.*'},
        # 'best_prec1': top-1 %}. Its option-A shortcut has no parameters, like ours.
        sd, notes = _normalize_keys(_tensor_dict(obj["state_dict"], path, "'state_dict'"))
        sd = {_rename_cifar_project(k): v for k, v in sd.items()}
        best = obj["best_prec1"]
        meta.update(
            format="pytorch_resnet_cifar10",
            preprocess=dict(CIFAR10_PROJECT_PREPROCESS),
            classes=list(CIFAR10_CLASSES),
            extra={"best_prec1": float(best)},
            notes=[*notes, "inputs normalised with ImageNet per-channel mean/std"],
        )
        _fill_architecture(meta, sd)
        return sd, meta
    if isinstance(obj, dict) and obj and not _is_tensor_dict(obj):
        for key in ("state_dict", "model", "model_state_dict", "model_state"):
            if _is_tensor_dict(obj.get(key)):
                meta["notes"].append(f"weights taken from the file's {key!r} entry")
                obj = obj[key]
                break
    sd, notes = _normalize_keys(_tensor_dict(obj, path, "file"))
    meta["notes"] += notes
    arch = _fill_architecture(meta, sd)
    if arch is not None and arch[2] == "imagenet" and meta["model_name"].startswith("resnet"):
        # A bare state_dict in torchvision's layout: assume torchvision's own (v1.5) weights.
        meta["format"] = "torchvision"
        meta["preprocess"] = dict(TORCHVISION_PREPROCESS)
        if meta["model_options"].get("num_classes", 1000) == 1000:
            meta["classes"] = _imagenet_classes()
        if "stride_in_3x3" in meta["model_options"]:
            meta["notes"].append(
                "assumed torchvision v1.5 (stride in the bottleneck's 3x3); weights alone cannot "
                "tell v1 from v1.5: build the model with stride_in_3x3=False for v1 weights"
            )
    return sd, meta


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _tensor_dict(obj: Any, path: Path, what: str) -> StateDict:
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise WeightsError(
            f"{path}: {what} is not a state_dict of named tensors (top-level keys: {keys}); "
            "expected a reslab checkpoint, a state_dict, a pytorch_resnet_cifar10 .th file or "
            "safetensors"
        )
    raise WeightsError(f"{path}: {what} holds a {type(obj).__name__}, not a state_dict")


def _normalize_keys(sd: StateDict) -> tuple[StateDict, list[str]]:
    """Strip wrappers' prefixes: DataParallel/DDP `module.`, torch.compile `_orig_mod.`."""
    notes = []
    for prefix in ("module.", "_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
            notes.append(f"stripped the {prefix!r} prefix")
    return sd, notes


def _rename_cifar_project(key: str) -> str:
    if key.startswith("linear."):
        return "fc." + key[len("linear.") :]
    # Their option-B shortcut is a Sequential(conv, bn) named `shortcut`.
    return key.replace(".shortcut.", ".downsample.")


def _fill_architecture(meta: dict[str, Any], sd: StateDict) -> tuple[str, dict, str] | None:
    arch = infer_architecture(sd)
    if arch is not None:
        meta["model_name"] = arch[0]
        meta["model_options"] = {**arch[1], **meta["model_options"]}
    return arch


def _imagenet_classes() -> list[str] | None:
    try:
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    except (ImportError, AttributeError, KeyError):
        return None


# ----------------------------------------------------------------------------------- loading


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, head: str = "load"
) -> WeightsInfo:
    """Load a weights file of any supported format into `model`.

    strict=True (default): every key and shape must match, else a WeightsError lists what
    differs. strict=False loads the tensors that fit and warns naming the ones that do not; the
    lists are in the returned WeightsInfo. head="reinit" (fine-tuning on new classes) leaves the
    model's classifier (its last nn.Linear) as initialised and ignores the file's; everything else
    is still checked as `strict` says.
    """
    if head not in ("load", "reinit"):
        raise ValueError(f"head must be 'load' or 'reinit', got {head!r}")
    sd, meta = read_weights(path)
    if head == "reinit":
        prefix = _head_prefix(model)
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        meta = {**meta, "classes": None, "notes": [*meta["notes"], f"head {prefix}* not loaded"]}
        return _load_state(model, sd, meta, Path(path), strict=strict, skip=prefix)
    return _load_state(model, sd, meta, Path(path), strict=strict)


def _head_prefix(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to re-initialise")
    return linears[-1] + "."


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
    _check_stride(model, meta, info)
    # sd now holds exactly the checked keys: what is left out (a new head, or what strict=False
    # skipped with a warning) keeps its initial values.
    model.load_state_dict(sd, strict=False)
    return info


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
    metadata = {
        "format": "reslab",
        "model_name": model_name,
        "model_options": json.dumps(model_options),
        "preprocess": json.dumps(pre),
        "classes": json.dumps(classes),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
