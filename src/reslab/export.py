"""Export a model to ONNX or TorchScript with a dynamic batch dimension and its metadata.

The exported graph maps a normalised float batch [N, 3, H, W] to logits [N, classes]. How to
normalise (the preprocess dict) and the class names travel inside the file: ONNX
``metadata_props`` and TorchScript ``_extra_files``, all under keys starting with ``reslab.``,
so a consumer needs nothing but the file. :func:`read_export_metadata` reads them back.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.models import model_info
from reslab.models.weights import WeightsInfo

FORMATS = ("onnx", "torchscript")
_TS_META = "reslab.json"  # name of the TorchScript extra file holding the metadata


def export_metadata(
    *,
    model_name: str | None,
    model_options: dict[str, Any],
    preprocess: dict[str, Any] | None,
    classes: list[str] | None,
    input_size: int,
) -> dict[str, str]:
    """The metadata strings both formats carry (a per-pixel mean image becomes nested lists)."""
    pre = None if preprocess is None else dict(preprocess)
    if pre is not None and isinstance(pre.get("mean"), torch.Tensor):
        pre["mean"] = pre["mean"].tolist()  # [3, H, W] -> nested lists, JSON-safe
    return {
        "reslab.model_name": model_name or "",
        "reslab.model_options": json.dumps(model_options),
        "reslab.preprocess": json.dumps(pre),
        "reslab.classes": json.dumps(classes),
        "reslab.input_size": str(input_size),
        "reslab.input": "float32 [batch, 3, H, W], normalised as reslab.preprocess says",
        "reslab.output": "float32 [batch, classes] logits (softmax for probabilities)",
    }


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str,
    input_size: int,
    model_name: str | None = None,
    model_options: dict[str, Any] | None = None,
    preprocess: dict[str, Any] | None = None,
    classes: list[str] | None = None,
) -> Path:
    """Write `model` (on CPU, eval mode, fp32) to `path` as ONNX or TorchScript. Atomic write."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    from reslab.models.registry import MAX_INPUT_SIZE

    if (
        not isinstance(input_size, int)
        or isinstance(input_size, bool)
        or not 8 <= input_size <= MAX_INPUT_SIZE
    ):
        raise ValueError(f"input_size must be a whole number of pixels in 8..{MAX_INPUT_SIZE}, "
                         f"got {input_size!r}")  # fmt: skip
    path = Path(path)
    from reslab.runtime.checkpoint import check_target

    check_target(path)  # a folder there, or none for it: named before the export runs
    if format == "onnx":  # torch.onnx's exporter imports onnxscript; without it, a traceback
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"ONNX export needs {' and '.join(missing)}: pip install "
                             f"{' '.join(missing)} (or reslab[export]), or export TorchScript "
                             "(--format torchscript)")  # fmt: skip
    meta = export_metadata(
        model_name=model_name,
        model_options=model_options or {},
        preprocess=preprocess,
        classes=classes,
        input_size=input_size,
    )
    # A copy: .to() and .eval() work in place, and the caller's model (a snapshot exported
    # during training, a bf16 or CUDA model) must stay in its mode, dtype and device.
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    # Batch 2 for tracing: a batch of 1 could let a tracer specialise the batch dimension.
    example = torch.randn(2, 3, input_size, input_size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if format == "onnx":
            _export_onnx(model, example, tmp, meta)
        else:
            _export_torchscript(model, example, tmp, meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_weights(
    model: nn.Module, info: WeightsInfo, path: str | os.PathLike, *, format: str
) -> tuple[Path, int]:
    """`reslab export`: export_model with what the weights file says of itself; the input size
    is its preprocessing's, else the architecture's. Returns the file and that size."""
    size = (info.preprocess or {}).get("input_size") or model_info(info.model_name).input_size
    out = export_model(model, path, format=format, input_size=size, model_name=info.model_name,
                       model_options=info.model_options, preprocess=info.preprocess,
                       classes=info.classes)  # fmt: skip
    return out, size


def _export_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=18,
            verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(out))


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated upstream but is still what TorchScript consumers load.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        # opened here: a folder that refuses the file is an OSError naming it (torch's own
        # writer raised a RuntimeError from C++ without the path)
        with open(out, "wb") as f:
            torch.jit.save(traced, f, _extra_files={_TS_META: json.dumps(meta)})


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The reslab metadata of an exported file, decoded: model_name, model_options, preprocess,
    classes, input_size."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and kin: no common base to name
            raise ValueError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
        raw = {p.key: p.value for p in proto.metadata_props}
    else:
        # The metadata is a JSON entry of TorchScript's zip archive: read it alone (loading the
        # module would build every weight; a plain torch.save file has no such entry).
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(f"/extra/{_TS_META}")), None)
                raw = json.loads(z.read(name)) if name else {}
        except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a TorchScript export ({type(e).__name__}); reslab "
                             "exports .onnx or TorchScript .pt files") from None  # fmt: skip
    if not isinstance(raw, dict) or "reslab.preprocess" not in raw:
        raise ValueError(f"{path} carries no reslab metadata (not exported by reslab?)")
    return {
        "model_name": raw["reslab.model_name"] or None,
        "model_options": json.loads(raw["reslab.model_options"]),
        "preprocess": json.loads(raw["reslab.preprocess"]),
        "classes": json.loads(raw["reslab.classes"]),
        "input_size": int(raw["reslab.input_size"]),
    }
