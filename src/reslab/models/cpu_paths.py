"""The CPU training paths a `reslab train` run turns on, in one place for the trainer and the
benchmarks: relu(bn(x) [+ shortcut]) as one fused kernel (models/bn_act.py) and the 3x3 convs'
weight gradients from the AMX kernel or over tiled images (models/tiled_wgrad.py); with both,
BasicBlocks as one op where the AMX kernels run (stride 1, and stride 2 with option A's shortcut
or none; models/block_op.py). They only change how a training step is computed: weights,
outputs and state_dict stay the same."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from reslab.models import block_op
from reslab.models import tiled_wgrad as _tiled
from reslab.models.bn_act import kernel_needs_build, kernel_status, load_kernel, use_fused_bn_act


def use_cpu_training_paths(
    model: nn.Module,
    *,
    precision: str,
    fused_bn_act: bool = True,
    tiled_wgrad: bool = True,
    announce: Callable[[str], None] | None = None,
) -> tuple[str | None, str | None]:
    """Flag `model`'s blocks for the CPU paths chosen (the config's `fused_bn_act` and
    `tiled_wgrad`) and return the run banner's two lines: how relu(bn(x) [+ r]) is computed
    and how the 3x3 weight gradients sum; None for a path that is off or that no module takes
    (AlexNet has no such blocks). The fused kernel is built (or found in torch's cache) here,
    not inside the first timed step; `announce` is told first where that means compiling it."""
    kernel = wgrad = None
    if fused_bn_act and use_fused_bn_act(model):
        if announce is not None and kernel_needs_build():
            announce(
                "compiling the CPU kernels for this CPU, once per environment "
                "(about 40 s on 2 cores)"
            )
        load_kernel()
        kernel = kernel_status()
    if tiled_wgrad and _tiled.use_tiled_wgrad(model):
        wgrad = _tiled.status(precision)
        if kernel is not None and wgrad.startswith("AMX kernel") and block_op.ENABLED:
            # models/block_op.py
            wgrad += "; stride-1 blocks of equal widths and option-A transitions as one op"
    return kernel, wgrad


__all__ = ["use_cpu_training_paths"]
