"""The one call that turns on the CPU training paths for the trainer and the benchmarks."""

from __future__ import annotations

import pytest

from reslab.models import create_model
from reslab.models.blocks import BasicBlock, Bottleneck
from reslab.models.cpu_paths import use_cpu_training_paths


def _flags(model, name: str) -> set[bool]:
    return {getattr(m, name) for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tiled", [True, False])
def test_each_flag_reaches_every_block_and_the_banner(fused: bool, tiled: bool) -> None:
    model = create_model("resnet20")
    kernel, wgrad = use_cpu_training_paths(
        model, precision="bf16", fused_bn_act=fused, tiled_wgrad=tiled
    )
    assert _flags(model, "fused_bn_act") == {fused}
    assert _flags(model, "tiled_wgrad") == {tiled}
    assert (kernel is not None) == fused and (wgrad is not None) == tiled
    if fused:
        assert "fused kernel" in kernel or "eager" in kernel  # built, or why not
    if tiled:
        assert wgrad.startswith(("AMX kernel", "tiled", "direct"))


def test_fp32_runs_say_the_weight_gradients_are_direct() -> None:
    _, wgrad = use_cpu_training_paths(create_model("resnet20"), precision="fp32")
    assert wgrad is not None and wgrad.startswith("direct (fp32")


def test_a_net_without_blocks_turns_nothing_on() -> None:
    assert use_cpu_training_paths(create_model("alexnet"), precision="bf16") == (None, None)
