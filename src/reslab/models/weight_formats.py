"""Weights file formats: detect what a file is and read it into reslab's parameter names.

Every file is read without running code: safetensors directly, anything pickled only through
reslab.errors.safe_torch_load (weights_only=True). Used by reslab.models.weights.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from reslab.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from reslab.errors import UserError, check_checkpoint_version, safe_torch_load, torch_load_failure
from reslab.models.arch import infer_architecture

StateDict = dict[str, torch.Tensor]

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
# pytorch_resnet_cifar10 normalises CIFAR-10 inputs with ImageNet's per-channel statistics.
CIFAR10_PROJECT_PREPROCESS = {
    "kind": "cifar", "input_size": 32, "resize": None, "mode": "per_channel",
    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
}  # fmt: skip
TORCHVISION_PREPROCESS = {
    "kind": "imagenet", "input_size": 224, "resize": 256, "mode": "per_channel",
    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
}  # fmt: skip
_MEAN_TENSOR_KEY = "__reslab_preprocess_mean__"  # a per-pixel mean image inside safetensors


class WeightsError(UserError):
    """A weights file that cannot be used (unreadable, unknown layout, or not fitting)."""


class UnsafeWeightsError(WeightsError):
    """A pickled file that needs more than tensors and containers to load (it could run code)."""


# ----------------------------------------------------------------------------------- reading


def read_weights(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read a weights file of any supported format -> (state_dict in reslab names, meta).

    meta has keys format, model_name, model_options, preprocess, classes, extra, notes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (or is not a file)")
    try:
        sd, meta = (
            _read_safetensors(path)
            if _is_safetensors(path)
            else _interpret(_torch_load(path), path)
        )
    except UserError:  # WeightsError, CheckpointError: already one clear line
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise WeightsError(f"{path}: its metadata cannot be read ({type(e).__name__}: {e}); "
                           "export the weights again") from None  # fmt: skip
    check_meta(meta, path)
    return sd, meta


def check_meta(meta: dict[str, Any], path: Path) -> None:
    """What the file says besides its tensors has the types and ranges reslab relies on: a
    file cannot turn into a traceback (or a 24 TB allocation) deep inside predict or export."""

    def bad(what: str) -> WeightsError:
        return WeightsError(f"{path}: {what}; write the file again with reslab (a training run "
                            "or models.weights.save_safetensors)")  # fmt: skip

    if meta.get("model_name") is not None and not isinstance(meta["model_name"], str):
        raise bad(f"model_name is {meta['model_name']!r}, not a model's name")
    if not isinstance(meta.get("model_options"), dict):
        raise bad(f"model_options is a {type(meta.get('model_options')).__name__}, not a mapping")
    from reslab.models.registry import option_type_problem

    problem = option_type_problem(meta["model_options"])
    if problem:
        raise bad(f"model_options.{problem}")
    classes = meta.get("classes")
    if classes is not None and not (
        isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)
    ):
        raise bad(f"classes is {type(classes).__name__} {str(classes)[:40]}, not a list of names")
    if classes is not None and len(set(classes)) < len(classes):
        twice = next(c for i, c in enumerate(classes) if c in classes[:i])
        raise bad(f"classes names {twice!r} more than once (two outputs would print alike)")
    pre = meta.get("preprocess")
    if pre is None:
        return
    if not isinstance(pre, dict):
        raise bad(f"preprocess is a {type(pre).__name__}, not a mapping")
    from reslab.data.preprocess import Preprocess
    from reslab.models.registry import MAX_INPUT_SIZE, MAX_RESIZE

    if not isinstance(pre.get("square", False), bool):
        raise bad(f"preprocess square is {pre['square']!r}, not true or false")
    size = pre.get("input_size", 32)
    if not isinstance(size, int) or isinstance(size, bool):  # from_dict's int() would truncate
        raise bad(f"preprocess input_size is {size!r}, not a whole number of pixels")
    try:
        p = Preprocess.from_dict(pre)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise bad(f"preprocess is damaged ({type(e).__name__}: {str(e)[:80]})") from None
    resize = pre.get("resize")
    if not 8 <= p.input_size <= MAX_INPUT_SIZE or not (
        resize is None or (isinstance(resize, int) and p.input_size <= resize <= MAX_RESIZE)
    ):
        raise bad(f"preprocess input_size {p.input_size} / resize {resize!r} is out of range")
    if p.mean.dim() != 3 or p.mean.shape[0] != 3 or not torch.isfinite(p.mean).all():
        raise bad(f"preprocess mean has shape {list(p.mean.shape)} or non-finite values")
    if tuple(p.mean.shape[1:]) not in ((1, 1), (p.input_size, p.input_size)):
        # A mean image is subtracted from inputs of input_size: any other size would fail as a
        # broadcast error deep inside predict (eval and training fall back to its channel means).
        raise bad(f"preprocess mean image is {p.mean.shape[1]}x{p.mean.shape[2]} but input_size "
                  f"is {p.input_size}")  # fmt: skip
    if p.std.shape != (3, 1, 1) or not (torch.isfinite(p.std).all() and (p.std > 0).all()):
        raise bad(f"preprocess std {p.std.flatten().tolist()} is not 3 positive numbers")


def check_classes_fit(classes: list[str] | None, model: torch.nn.Module, path: Path) -> None:
    """A file names at most one class per output of the model: more names than outputs would
    be off by one for all the model knows. Fewer are accepted: runs trained with --num-classes
    above their data's class count (refused since session 23) wrote such files, and
    their extra outputs, which never saw a sample, print as "(output N)"."""
    from reslab.models.registry import get_classifier

    weight = getattr(get_classifier(model), "weight", None)
    if classes is None or weight is None or len(classes) <= weight.shape[0]:
        return
    raise WeightsError(f"{path}: its metadata names {len(classes)} classes but the model has "
                       f"{weight.shape[0]} outputs; write the file again with reslab (a training "
                       "run or models.weights.save_safetensors)")  # fmt: skip


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


def _torch_load(path: Path) -> Any:
    try:
        return safe_torch_load(path)
    except UserError:  # a TorchScript export: already one line saying what to pass instead
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        reason = _unsafe_reason(msg)
        # A pickle (protocol >= 2 starts with 0x80) that the weights-only unpickler stops: it
        # asks for a global, or for an opcode beyond tensors and containers. Random bytes also
        # hit "Unsupported operand" but are no pickle: those are reported as corrupt below.
        with path.open("rb") as f:
            head = f.read(32)
        pickled = "GLOBAL" in reason or head[:1] == b"\x80"
        # torch.save's non-zip format opens with a pickled magic number (a LONG1 of 10 bytes)
        legacy = b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") in head
        if pickled and legacy and reason.startswith("Unsupported operand"):
            raise UnsafeWeightsError(
                f"refusing to load {path}: torch.save's old non-zip format written with pickle "
                f"protocol {head[1]}, which torch's safe loader cannot read. If you trust the "
                "file, load it yourself and save it again with torch.save's default (zip) "
                "format or as safetensors."
            ) from None
        if pickled and reason.startswith("Unsupported operand") and head[1:2] >= b"\x03":
            # pickle.dump's own output (protocol 3+; torch.save's non-zip format is protocol
            # 2, its zip format no bare pickle): torch's loader cannot read it at all, so it is
            # not "more than tensors" but another kind of file, harmless or not.
            raise UnsafeWeightsError(
                f"refusing to load {path}: a plain Python pickle (protocol {head[1]}), not a "
                "file torch.save or safetensors writes; reslab never unpickles those (a pickle "
                "can run code). If you trust it, load it yourself and save its state_dict with "
                "torch.save or as safetensors."
            ) from None
        if ("weights only" in msg.lower() or "weights_only" in msg) and pickled:
            raise UnsafeWeightsError(
                f"refusing to load {path}: unpickling it needs more than tensors and plain "
                f"containers ({reason}), and a full unpickle could run arbitrary code. reslab "
                "loads pickled files only with torch.load(weights_only=True). If you trust the "
                "file, load it yourself and re-save just its state_dict (or save it as "
                "safetensors)."
            ) from None
        raise WeightsError(
            f"{path} is not a readable weights file (truncated or corrupt?): "
            f"{torch_load_failure(e)}"
        ) from None
    except Exception as e:  # truncated zip, safetensors header errors, random bytes, ...
        raise WeightsError(
            f"{path} is not a readable weights file (truncated or corrupt?): "
            f"{torch_load_failure(e)}"
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
        from reslab.runtime.checkpoint import check_digest

        check_checkpoint_version(obj, path)
        check_digest(obj, path)
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
        fc = sd.get("fc.weight")
        ten = isinstance(fc, torch.Tensor) and fc.dim() == 2 and fc.shape[0] == 10
        meta.update(
            format="pytorch_resnet_cifar10",
            preprocess=dict(CIFAR10_PROJECT_PREPROCESS),
            classes=list(CIFAR10_CLASSES) if ten else None,  # its CIFAR-100 files: no names
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
