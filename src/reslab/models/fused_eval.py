"""Eval-mode convolutions whose bias, residual add and ReLU oneDNN applies as it writes the output.

Once reslab.inference.fold_batchnorm has folded every BatchNorm into the convolution before it
(as `reslab eval`, a run's evaluations and `reslab predict` build the model), an eval block is
relu(conv2(relu(conv1(x) + b1)) + b2 + shortcut(x)). Eager ops run each conv, then one more pass
over memory for each ReLU and add. torch.ops.mkldnn._convolution_pointwise (the fused conv that
inductor's CPU freezing pass emits; the same schema in torch 2.11 and 2.14) applies them to each
output tile while it is in cache, and rounds a bf16 output once instead of after each op.
Measured against the eager ops (session 40, 2 Intel Xeon cores with AMX, benchmarks/ab_fused_eval.py):
ResNet-20's blocks alone x1.16-1.56 in bf16; whole models in bf16 x1.32 (ResNet-18, 224px, batch
32) to x1.63 (ResNet-50); fp32 x1.04-1.15 (the same numbers to float rounding). On a CPU with
AMX, bf16 BasicBlocks of 32 images or more keep reslab's own kernel (models/block_op.py's
`infer`): on whole CIFAR ResNet tests the two were within 4% of each other, and at 32-128
images the kernel was 5-10% faster.

Applies (else the caller runs its eager ops): a CPU with oneDNN, grad mode off, not scripting,
tracing or compiling (those see the eager ops), a plain 4-d channels_last tensor, computing in
bf16 (CPU bf16 autocast, or a bf16 input without autocast) or fp32 (fp32 input, no autocast),
plain nn.Conv2d layers (zero padding, numeric padding) whose BatchNorm is folded (nn.Identity),
and no hooks on the block or its parts.

Packed weights (session 42, `enable_packing`; reslab.inference.InferenceModel turns it on for
bf16 on the CPU): the fused op reorders a plain bf16 weight into oneDNN's blocked layout on every
call, which at a few images cost more than the convolution (512 -> 512 channels 3x3 on 7x7, one
image: 854 us eager, 267 us with the weight reordered once). A model with packing on keeps each
conv's reordered weight per input shape (torch.ops.mkldnn._reorder_convolution_weight, as
inductor's freezing pass does; the same outputs to the bit) and takes the fused op at any size.
`reslab eval` and a run's evaluations (engine/eval_run.fast_eval_model) do not pack: at their
passes of 32-500 images packing measured x0.99-1.03 (session 43: ResNet-20 500 32px images,
ResNet-18 / ResNet-50 32 and 320 224px images, bf16, 5 alternating rounds), and each
evaluation's fresh copy would pack again.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from reslab.models.layers import _hooked

ENABLED = True  # off: eval blocks run their eager ops (A/B benchmarks, tests)
# Inputs of fewer elements keep the eager ops: there the fused op's per-call work (casts,
# checks) did not pay (session 40, InferenceModel on ResNet-20 with every conv fused: x0.79 and
# x0.87 of the eager ops at 1 and 8 images in bf16, x0.67 at 1 image in fp32; from 256 images,
# where every block's input is over this limit, x1.11-1.15 in fp32).
MIN_ELEMENTS = 1 << 20
PACK = True  # off: convs with packing on reorder their weight every call (A/B benchmarks, tests)
PACKED_SHAPES = 4  # input shapes a conv keeps a packed weight for (the oldest dropped first)
# conv -> {(input shape): ((weight version, data pointer), packed weight)}, for the convs of
# models that enable_packing prepared; weak, so a dropped model frees its packed weights (and a
# deepcopy of the model is not packed: oneDNN's opaque tensors do not copy)
_PACKED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def enable_packing(model: nn.Module) -> int:
    """Let every plain nn.Conv2d of `model` keep its bf16 weight in oneDNN's blocked layout
    for the input shapes it meets (up to PACKED_SHAPES), and take the fused op at any size in
    bf16: for a model that runs inference only (its weights are checked for changes, not for
    gradients). Returns the number of convs prepared."""
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    for m in convs:
        _PACKED.setdefault(m, {})
    return len(convs)


def _packing(*convs: nn.Module) -> bool:
    return PACK and all(c in _PACKED for c in convs)


def _weight(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w (conv's weight in x's dtype), or, for a packed conv in bf16, the same weight in
    oneDNN's layout for x's shape, reordered on the first call with that shape (again after
    the weight changed)."""
    cache = _PACKED.get(conv) if PACK and w.dtype == torch.bfloat16 else None
    if cache is None:
        return w
    key, version = tuple(x.shape), (conv.weight._version, conv.weight.data_ptr())
    entry = cache.get(key)
    if entry is None or entry[0] != version:
        if entry is None and len(cache) >= PACKED_SHAPES:
            cache.pop(next(iter(cache)))
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            list(x.shape),
        )  # fmt: skip
        entry = cache[key] = (version, packed)
    return entry[1]


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's fused convolution and it runs here (one tiny call)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            _pointwise(x, torch.ones(16, 16, 3, 3), None, (1, 1), (1, 1), (1, 1), 1, "relu")
    except (AttributeError, RuntimeError):
        return False
    return True


def _pointwise(x, w, b, padding, stride, dilation, groups, attr):  # type: ignore[no-untyped-def]
    return torch.ops.mkldnn._convolution_pointwise(
        x, w, b, list(padding), list(stride), list(dilation), groups, attr, [], ""
    )


def compute_dtype(x: torch.Tensor, packed: bool = False) -> torch.dtype | None:
    """The dtype the fused convolutions compute x's forward in, or None where they do not apply
    (packed: for convs with packed weights, which take bf16 inputs of any size)."""
    if not ENABLED or torch.is_grad_enabled():
        return None
    # a plain tensor (not a Proxy, FakeTensor or other subclass: those are traced, not run);
    # the size before the rest: the few-image calls of `reslab predict` end here, cheaply
    if type(x) is not torch.Tensor or (x.numel() < MIN_ELEMENTS and not packed):
        return None
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    if x.device.type != "cpu" or x.dim() != 4:
        return None
    if not x.is_contiguous(memory_format=torch.channels_last):
        return None  # NCHW inputs keep the eager ops (the fused path is measured in channels_last)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return None
    elif x.dtype in (torch.float32, torch.bfloat16):
        dtype = x.dtype
    else:
        return None
    if packed and x.numel() < MIN_ELEMENTS and dtype != torch.bfloat16:
        return None  # (fp32 weights are not packed: below the limit, eager stays faster)
    return dtype if available() else None


def _plain(conv: nn.Module, norm: nn.Module | None = None) -> bool:
    """conv is a plain nn.Conv2d that the fused op computes as eager would, BN folded away."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.device.type == "cpu"
        and (norm is None or type(norm) is nn.Identity)
        and not _hooked(conv)
        and (norm is None or not _hooked(norm))
    )


def conv(
    conv: nn.Conv2d,
    x: torch.Tensor,
    dtype: torch.dtype,
    *,
    relu: bool,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """[relu](conv(x) + conv.bias [+ add]) in `dtype`, x: [N, C, H, W] channels_last; the
    caller checked `_plain(conv)` and `compute_dtype(x) == dtype`."""
    w = _weight(conv, x, conv.weight.to(dtype))
    # in the input's dtype, as autocast casts it for the eager conv (oneDNN's fused binary op
    # requires that)
    b = None if conv.bias is None else conv.bias.to(dtype)
    args = (conv.padding, conv.stride, conv.dilation)
    x = x.to(dtype)
    if add is None:
        return _pointwise(x, w, b, *args, conv.groups, "relu" if relu else "none")
    add = add.to(dtype).contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, add, w, b, *(list(a) for a in args), conv.groups,
        "add", None, "relu" if relu else None, [], "",
    )  # fmt: skip


def stem(conv_: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """relu(norm(conv_(x))) for a stem whose norm is folded, or None where this does not apply."""
    dtype = compute_dtype(x, _packing(conv_))
    if dtype is None or not _plain(conv_, norm):
        return None
    return conv(conv_, x, dtype, relu=True)


def _shortcut(block: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block's shortcut of x: x itself, option A's padded subsample (eager), or a folded
    projection (options B/C: Sequential(conv, Identity)) as one fused conv."""
    ds = block.downsample
    if ds is None:
        return x
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and _plain(ds[0], ds[1]) and not _hooked(ds):
        return conv(ds[0], x, dtype, relu=False)
    return ds(x)


def block(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """block(x) for an eval-mode BasicBlock or Bottleneck with folded BatchNorms, each conv one
    fused op (the last with the shortcut's add), or None where this does not apply."""
    if block.training:
        return None
    k = 3 if hasattr(block, "conv3") else 2  # Bottleneck: conv1, conv2, conv3; BasicBlock: two
    pairs = [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, k + 1)]
    ds = block.downsample if isinstance(block.downsample, nn.Sequential) else ()
    dtype = compute_dtype(x, _packing(*(c for c, _ in pairs), *ds[:1]))
    if dtype is None or _hooked(block):
        return None
    if not all(_plain(c, n) for c, n in pairs):
        return None
    short = _shortcut(block, x, dtype) if block.residual else None
    out = x
    for c, _ in pairs[:-1]:
        out = conv(c, out, dtype, relu=True)
    return conv(pairs[-1][0], out, dtype, relu=True, add=short)


__all__ = [
    "ENABLED",
    "PACK",
    "available",
    "block",
    "compute_dtype",
    "conv",
    "enable_packing",
    "stem",
]
