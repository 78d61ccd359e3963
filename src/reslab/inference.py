"""reslab's default inference path: channels_last, BatchNorm folded into the convolutions, bf16
autocast where the hardware has it.

Why these defaults (figures and commands: README, results/benchmarks/infer_*.txt): folding and
channels_last keep fp32 numbers, bf16 keeps >= 99.5% top-1 agreement on a trained net, so
bf16 autocast is the default where the CPU/GPU has native bf16; onnxruntime is a backend option
(exact fp32 numbers; at batch 1 the fastest path that keeps >= 99.5% agreement). torch.compile
is not the default: its compile time (minutes for ResNet-50 on few cores) would dominate a
`reslab predict` run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from reslab.engine.evaluator import forward_chunk
from reslab.models import fused_eval
from reslab.models.blocks import BasicBlock, Bottleneck
from reslab.models.cifar import CifarResNet
from reslab.models.resnet import ResNet
from reslab.runtime.memory import tune_malloc
from reslab.runtime.precision import autocast, resolve_precision

BACKENDS = ("torch", "onnxruntime")
PRECAST = True  # off: CPU bf16 weights cast by autocast on every call (benchmarks/ab_precast.py)


class InferenceModel:
    """Wraps an eval-mode model for fast batched inference: float [N, 3, H, W] -> fp32 logits.

    backend "torch" (default): the model (a copy when fold_bn) moves to `device` in
    channels_last; inputs are made channels_last too. `precision` follows the one policy of
    reslab.runtime.precision (auto: bf16, fp16 on a GPU without native bf16, or fp32); under
    autocast weights stay fp32 and accumulation-sensitive ops run in fp32.
    backend "onnxruntime": the model is exported to ONNX (fp32, CPU) once, then run by an
    onnxruntime session with torch's thread count; `input_size` is needed for the export.
    fold_bn (torch backend): each eval-mode BatchNorm is folded into the convolution before it
    (a copy of the model; the caller's model is untouched), saving one pass over every
    activation map; fp32 outputs equal the unfolded model's to float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str = "cpu",
        precision: str = "auto",
        backend: str = "torch",
        input_size: int | None = None,
        fold_bn: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        from reslab.runtime.distributed import resolve_device

        # reslab's device rule: "cuda" on a machine without one is a line saying so, not
        # torch's "invalid argument to exchangeDevice" at the first call
        self.device, self.backend = resolve_device(str(device)), backend
        tune_malloc()  # a forward's activations reused from the heap (reslab.runtime.memory)
        if backend == "onnxruntime":
            if self.device.type != "cpu" or precision not in ("auto", "fp32") or not input_size:
                raise ValueError(
                    "the onnxruntime backend runs fp32 on the CPU and needs input_size"
                )
            self.precision = "fp32"
            self._session = _ort_session(model, input_size)
            self.model = model
            return
        self.precision = resolve_precision(precision, self.device)
        model = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
        # fp32 weights whatever the model was held in (a bf16/fp16 model at precision fp32 had
        # met fp32 inputs); bf16 gets them back in bf16 below, or by autocast
        self.model = model.to(self.device, torch.float32, memory_format=torch.channels_last)
        if PRECAST and self.device.type == "cpu" and self.precision == "bf16":
            precast(self.model, torch.bfloat16)
        if self.device.type == "cpu" and self.precision == "bf16":
            # each conv's weight reordered for oneDNN once per input shape, not every call
            # (ResNet-50 at one 224px image x1.5; models/fused_eval.py)
            fused_eval.enable_packing(self.model)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = f"a {tuple(x.shape)} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"InferenceModel takes normalised images as a float tensor "
                            f"[N, C, H, W]; got {got}")  # fmt: skip
        if not x.is_floating_point():
            raise TypeError(f"InferenceModel takes normalised float images, got {x.dtype}; "
                            "normalise them first (reslab.data.preprocess.Preprocess)")  # fmt: skip
        x = x.float()  # fp16/bf16/fp64 in; autocast makes bf16 of it where that is the precision
        if self.backend == "onnxruntime":
            (out,) = self._session.run(None, {"input": x.contiguous().numpy()})
            return torch.from_numpy(out)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        # On the CPU in passes of at most forward_chunk(x) images (a 256-image 224px batch in one
        # pass page-faulted its activations in afresh: engine/evaluator.py); a GPU in one pass.
        chunk = forward_chunk(x) if x.device.type == "cpu" else max(len(x), 1)
        with autocast(self.precision, self.device):
            parts = [self.model(part) for part in x.split(chunk)] if len(x) > chunk else None
            out = self.model(x) if parts is None else _concat(parts)
        if not isinstance(out, torch.Tensor):  # e.g. reslab.features(...): a dict of maps
            raise TypeError(f"InferenceModel runs classifiers (one tensor of logits); this "
                            f"model returns a {type(out).__name__}: call it directly")  # fmt: skip
        return out.float()

    def __repr__(self) -> str:
        layout = "onnxruntime" if self.backend == "onnxruntime" else "channels_last"
        return (
            f"InferenceModel({type(self.model).__name__}, device={self.device}, "
            f"precision={self.precision}, {layout})"
        )


def _concat(parts: list) -> object:
    """The passes' logits as one tensor (what is not a tensor is refused by the caller)."""
    return torch.cat(parts) if all(isinstance(o, torch.Tensor) for o in parts) else parts[0]


def precast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store each convolution's and linear layer's weight in `dtype`, in place: what autocast
    to `dtype` casts it to on every call (the same rounding, so the same outputs), done once.
    At a few images the casts had cost more than the convolutions (ResNet-20, bf16, 1 image:
    ~10% of the time). Biases stay fp32: reslab's eval kernel adds them unrounded (eager
    autocast rounds them per call, as before); norms and the rest keep their dtype."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.is_floating_point():
            m.weight.data = m.weight.data.to(dtype)
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm that directly follows a convolution
    folded into it: y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta becomes one conv with
    scaled weights and a bias. Pairs are found by reslab's naming (convK -> bnK in residual
    blocks and stems) and by (Conv2d, BatchNorm2d) neighbours in nn.Sequential (shortcuts B/C).
    A pair where either module has hooks of its own stays as it is, so that they see what
    they were registered for (a folded BatchNorm would be an Identity that never runs them).
    """
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck, CifarResNet, ResNet)):
            for k in (1, 2, 3):
                conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
                if _foldable(conv, bn):
                    setattr(module, f"conv{k}", fuse_conv_bn_eval(conv, bn))
                    setattr(module, f"bn{k}", nn.Identity())
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if _foldable(conv, bn):
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return model


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    """A Conv2d and a BatchNorm2d with running statistics (one without, track_running_stats=
    False, normalises each batch by its own statistics even in eval mode, which no fixed conv
    can), neither with hooks of its own."""
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return False
    hooked = any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in (conv, bn)
    )
    return bn.running_mean is not None and not hooked


def _ort_session(model: nn.Module, input_size: int):
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from reslab.export import export_model

    with tempfile.TemporaryDirectory() as d:
        path = export_model(
            copy.deepcopy(model), Path(d) / "model.onnx", format="onnx", input_size=input_size
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
