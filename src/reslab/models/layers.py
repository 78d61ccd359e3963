"""Small building layers shared by the model files: convs, shortcuts, AlexNet's LRN."""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 conv with padding 1 and no bias (BN follows every conv, section 3.4)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def set_block_flag(model: nn.Module, name: str, on: bool) -> int:
    """Set the class-level switch `name` (e.g. `fused_bn_act`, `tiled_wgrad`: how a block
    computes, never what) on every module that has it; returns how many have it."""
    n = 0
    for m in model.modules():
        if hasattr(m, name):
            setattr(m, name, on)
            n += 1
    return n


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def _eager_training(x: object) -> bool:
    """An eager tensor whose gradient is being recorded (not an fx Proxy, a trace or a compile)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()


class _SubsamplePad(torch.autograd.Function):
    """x[:, :, ::s, ::s] with `lo` zero channels before and `hi` after each of `groups` channel
    groups (1 for a net, K for K nets fused into one), in x's memory format both ways.
    Autograd's own backward of the strided slice returns an NCHW gradient even for a
    channels_last x: adding it to the conv branch's channels_last gradient then took a
    mixed-layout add and a layout copy, 4% of a ResNet-20 training step on a 2-core CPU."""

    @staticmethod
    def forward(ctx, x, stride, lo, hi, groups):  # type: ignore[override]
        ctx.geometry = (x.shape, _memory_format(x), stride, lo, x.shape[1] // groups, groups)
        return _pad_forward(x, stride, lo, hi, groups)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        shape, fmt, stride, lo, c, groups = ctx.geometry
        dx = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=fmt).zero_()
        _pad_backward_add(dx, g, stride, lo, c, groups)
        return dx, None, None, None, None


def _pad_forward(x: torch.Tensor, stride: int, lo: int, hi: int, groups: int) -> torch.Tensor:
    """subsample_pad(x, ...) in x's memory format."""
    if groups == 1 and _kernel_takes(x):  # one pass instead of three strided ones: a copy
        return _kernel().subsample_pad(x, stride, lo, hi)
    n, kc = x.shape[:2]
    c = kc // groups
    sub = x[:, :, ::stride, ::stride]
    h, w = sub.shape[2:]
    out = torch.empty((n, groups * (lo + c + hi), h, w), dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))  # fmt: skip
    # Splitting the channel dim is a view in either layout: [N, K, lo + C + hi, H/s, W/s].
    grouped = out.view(n, groups, lo + c + hi, h, w)
    grouped[:, :, :lo].zero_()
    grouped[:, :, lo + c :].zero_()
    grouped[:, :, lo : lo + c].copy_(sub.view(n, groups, c, h, w))
    return out


def _pad_backward_add(
    dx: torch.Tensor, g: torch.Tensor, stride: int, lo: int, c: int, groups: int
) -> None:
    """dx += the gradient of subsample_pad given its output's gradient g, in place: only the
    subsampled positions of dx [N, K*C, H, W] change (by g's unpadded channels)."""
    # The kernel writes dx behind autograd's back: not while a backward records a graph
    # (create_graph=True runs backward with grad mode on), where add_ is part of that graph.
    if groups == 1 and not torch.is_grad_enabled() and _kernel_add_subsampled(dx, g, stride, lo):
        return
    n, _, h, w = g.shape
    dx[:, :, ::stride, ::stride].view(n, groups, c, h, w).add_(
        g.view(n, groups, -1, h, w)[:, :, lo : lo + c]
    )


def _kernel():
    """The CPU kernels' module of models/bn_act.py where it is already built (training with the
    fused BN+ReLU flag builds it), else None."""
    from reslab.models import bn_act  # imported here: bn_act imports this module

    return bn_act.loaded_kernel()


def _kernel_takes(x: torch.Tensor) -> bool:
    """Whether the built kernels' option-A loops take x: a channels_last CPU tensor in bf16 or
    fp32 with a multiple of 16 channels (their results are not differentiable: the callers run
    inside autograd Functions)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 4:
        return False
    if x.shape[1] % 16 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return _kernel() is not None


def _kernel_add_subsampled(dx: torch.Tensor, g: torch.Tensor, stride: int, lo: int) -> bool:
    """The same in-place add through the CPU kernel where it takes these tensors: torch's
    strided add_ is slow for 16 channels a pixel. Returns whether it did the add."""
    if g.dtype != dx.dtype or g.device.type != "cpu" or g.dim() != 4 or not _kernel_takes(dx):
        return False
    if not g.is_contiguous(memory_format=torch.channels_last):
        return False
    _kernel().add_subsampled(dx, g, stride, lo)
    return True


class _ConvSubsamplePad(torch.autograd.Function):
    """(conv2d(x, weight), subsample_pad(x)) for a block whose conv1 and option-A shortcut read
    the same x, with one input gradient: the shortcut's gradient is added in place at the
    subsampled positions of the conv's input gradient. Autograd would build the shortcut's
    gradient as a zero-filled [N, C, H, W] tensor and add the two: a fill and a full add over
    x-sized memory, which at a CIFAR net's 32x32 -> 16x16 transition (bf16, batch 128) took
    ~4 ms of a ~80 ms ResNet-20 step on a 2-core CPU. The sum is the same, element by element."""

    @staticmethod
    def forward(ctx, x, weight, conv_args, pad_args, wgrad_kernel=False):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conv_args, ctx.pad_args, ctx.wgrad_kernel = conv_args, pad_args, wgrad_kernel
        stride, padding, dilation, groups = conv_args
        if wgrad_kernel:  # the AMX kernels apply (conv_wgrad.usable): the output may be theirs
            from reslab.models import conv_wgrad  # imports this module

            out = conv_wgrad.output(x, weight, stride[0])
        else:
            out = torch.ops.aten.convolution(
                x, weight, None, stride, padding, dilation, False, (0, 0), groups
            )
        return out, _pad_forward(x, *pad_args)

    @staticmethod
    def backward(ctx, g_out, g_short):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        # The weight gradient (and the input gradient where conv_wgrad.input_grad takes it) from
        # the AMX kernels where the caller found they apply (a 3x3 stride-2 conv1 of a CIFAR net
        # in CPU training, models/conv_wgrad.py), else oneDNN's.
        if ctx.wgrad_kernel:
            from reslab.models import conv_wgrad  # imports this module

            g = g_out.contiguous(memory_format=torch.channels_last)
            dx = conv_wgrad.input_grad(g, x, weight, stride[0])
            dw = None
            if ctx.needs_input_grad[1]:
                dw = conv_wgrad.weight_grad(x, g, weight, stride[0])
        else:
            mask = [True, ctx.needs_input_grad[1], False]
            dx, dw, _ = torch.ops.aten.convolution_backward(
                g_out, x, weight, None, stride, padding, dilation, False, (0, 0), groups, mask
            )
        pstride, lo, _hi, pgroups = ctx.pad_args
        _pad_backward_add(dx, g_short.to(dx.dtype), pstride, lo, x.shape[1] // pgroups, pgroups)
        return dx, dw, None, None, None


def subsample_pad(x: torch.Tensor, stride: int, lo: int, hi: int, groups: int = 1, *,
                  training: bool = True) -> torch.Tensor:  # fmt: skip
    """Option A's shortcut on x [N, groups * C, H, W] -> [N, groups * (lo + C + hi), H/s, W/s].
    `training`: the caller's mode; in eval mode the plain ops serve a gradient too (torch.func
    transforms, which a custom autograd Function without setup_context stops)."""
    if training and _eager_training(x):
        return _SubsamplePad.apply(x, stride, lo, hi, groups)
    # Plain ops for inference, export, torch.fx and torch.compile (which picks its own layouts);
    # no layout test on the one-group path, which torch.fx traces with proxies.
    fmt = _memory_format(x) if groups > 1 else torch.contiguous_format
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if (lo, hi) == (0, 0):
        return x
    if groups == 1:
        return torch.nn.functional.pad(x, (0, 0, 0, 0, lo, hi))
    n, kc, h, w = x.shape
    c = kc // groups
    out = x.new_zeros(n, groups * (c + lo + hi), h, w).contiguous(memory_format=fmt)
    out.view(n, groups, c + lo + hi, h, w)[:, :, lo : lo + c] = x.view(n, groups, c, h, w)
    return out


def _hooked(m: nn.Module) -> bool:
    """Any hook that calling `m` would run (its own or a global one)."""
    own = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    g = nn.modules.module
    glob = (g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
            g._global_backward_pre_hooks)  # fmt: skip
    return any(own) or any(glob)


class PadShortcut(nn.Module):
    """Option A shortcut (section 3.3): identity with stride-2 subsampling and zero-padded channels.

    [N, C, H, W] -> [N, C + pad, H/stride, W/stride]. No parameters.

    The paper only says "extra zero entries padded"; the new channels are split evenly on both
    sides, as in the widely used CIFAR re-implementation, so its checkpoints load and give their
    published accuracy unchanged.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        extra = out_planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return subsample_pad(x, self.stride, *self.pad, training=self.training)

    def with_conv(
        self, conv: nn.Module, x: torch.Tensor, *, wgrad_kernel: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(conv(x), self(x)) as one op whose input gradient skips autograd's zero-filled sum
        (_ConvSubsamplePad), in eager training where it computes exactly what the two calls
        would; None elsewhere (the caller makes the two calls). `wgrad_kernel`: the conv's
        weight gradient from the AMX kernel (the caller checked that it applies)."""
        if not (self.training and _eager_training(x)) or type(conv) is not nn.Conv2d:
            return None  # training only, as subsample_pad's own op
        if conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return None
        if _hooked(conv) or _hooked(self):
            return None  # one op does not call the modules, so their hooks would not run
        weight, dev = conv.weight, x.device.type
        if not torch.amp.is_autocast_available(dev):
            return None  # e.g. meta: is_autocast_enabled(dev) would raise
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if x.dtype != dtype or not weight.dtype.is_floating_point:
            return None  # autocast would cast x: leave that (and its gradient) to conv2d
        if weight.dtype != dtype:
            if not torch.is_autocast_enabled(dev) or weight.dtype == torch.float64:
                return None  # mixed dtypes outside autocast (or fp64, which autocast leaves)
            weight = weight.to(dtype)  # what autocast does for conv2d (the gradient flows back)
        conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        with torch.autocast(dev, enabled=False):
            pad_args = (self.stride, *self.pad, 1)
            out, short = _ConvSubsamplePad.apply(x, weight, conv_args, pad_args, wgrad_kernel)
        return out, short

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


def make_shortcut(
    in_planes: int, out_planes: int, stride: int, *, option: str, residual: bool
) -> nn.Module | None:
    """The shortcut of one block, or None for the identity (or for a plain net, which has none).

    A: parameter-free PadShortcut where shape changes, identity elsewhere.
    B: 1x1 projection + BN where shape changes, identity elsewhere.
    C: 1x1 projection + BN on every shortcut.
    """
    if not residual:
        return None
    changes = stride != 1 or in_planes != out_planes
    if option == "A":
        return PadShortcut(in_planes, out_planes, stride) if changes else None
    if option == "B" and not changes:
        return None
    if option in ("B", "C"):
        # Sequential so the parameter names are torchvision's downsample.0 / downsample.1.
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {option!r}")


class LocalResponseNorm(nn.Module):
    """AlexNet's local response normalisation (section 3.3 of Krizhevsky et al. 2012).

    b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2) ** beta, with k=2, n=5, alpha=1e-4,
    beta=0.75. torch's LocalResponseNorm divides alpha by n, so it is given alpha * n here.
    """

    def __init__(
        self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
    ) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.lrn = nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrn(x)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def make_activation(name: str) -> nn.Module:
    """ReLU (AlexNet section 3.1) or the saturating tanh it is compared against."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"activation must be 'relu' or 'tanh', got {name!r}")
