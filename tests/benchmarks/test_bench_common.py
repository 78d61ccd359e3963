"""The benchmarks' profile breakdown and convolution ceiling, on a real ResNet-20 at batch 4."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
common = pytest.importorskip("common")

from reslab.models import create_model  # noqa: E402


def test_step_profile_names_where_time_goes():
    torch.manual_seed(0)
    model = create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def step():
        with torch.profiler.record_function("data"):
            xb = x.flip(-1)
        loss = torch.nn.functional.cross_entropy(model(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    rows = common.step_profile(step, steps=2)
    fractions = dict(rows)
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert [f for _, f in rows] == sorted(fractions.values(), reverse=True)
    for category in ("convolution forward", "convolution backward", "batch norm forward",
                     "batch norm backward", "ReLU forward", "data: augmentation on the device"):  # fmt: skip
        assert fractions.get(category, 0.0) > 0.0, category
    text = common.format_profile(rows, "test")
    assert text.splitlines()[0].startswith("test:") and len(text.splitlines()) == len(rows) + 1


def test_conv_ceiling_times_every_convolution_once_per_shape():
    model = create_model("resnet20")  # option A: 19 convolutions, no projection shortcuts
    seconds, lines = common.conv_ceiling(model, batch=2)
    assert seconds > 0
    counts = [int(line.split(" x conv")[0]) for line in lines]
    assert sum(counts) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 19
    assert len(lines) == 6  # 3->16, 16->16, 16->32 s2, 32->32, 32->64 s2, 64->64
    # Each phase timed apart; the image (first conv's input) needs no input gradient.
    assert "fwd" in lines[0] and "wgrad" in lines[0] and "dgrad" not in lines[0]
    assert all("fwd" in line and "dgrad" in line and "wgrad" in line for line in lines[1:])


def test_conv_ceiling_times_the_weight_gradient_as_training_computes_it(monkeypatch):
    from reslab.models import conv_wgrad, tiled_wgrad

    monkeypatch.setattr(tiled_wgrad, "_amx", lambda: True)  # the rule of CPUs with AMX
    with monkeypatch.context() as m:  # tiling, where the AMX kernel does not take the shape
        m.setattr(conv_wgrad, "usable", lambda *a: False)
        _, lines = common.conv_ceiling(create_model("resnet20"), batch=16)
    tiled = [line for line in lines if "wgrad tiled t=4" in line]
    assert len(tiled) == 1 and "64->64 3x3 stride 1 on 8x8" in tiled[0]  # stage 3 alone
    assert all(" wgrad " in line for line in lines if line not in tiled)
    if not conv_wgrad.available():
        return
    monkeypatch.setattr(conv_wgrad, "_BLOCK", 1)  # the kernel at batch 16 too
    _, lines = common.conv_ceiling(create_model("resnet20"), batch=16)
    kernel = [line for line in lines if "wgrad kernel" in line]
    # every 3x3 shape but the stem's (3 channels): 16->16, 32->32, 64->64 and the two stride-2
    assert len(kernel) == 5 and sum("stride 2" in line for line in kernel) == 2
    assert all(" wgrad " in line for line in lines if line not in kernel)


def test_matmul_peak_keeps_to_its_time_where_one_product_would_not():
    """One 8192^2 fp32 product takes seconds on these CPUs (and one 2048^2 bf16 product 13 s
    where bf16 is emulated, AMD Zen 3): the measurement shrinks the matrices to keep its time."""
    import time

    t0 = time.perf_counter()
    flops = common.matmul_peak(torch.float32, n=8192, seconds=0.2)
    assert time.perf_counter() - t0 < 5.0
    assert 1e9 < flops < 1e15
    assert common.peak_dtype("bf16") == (torch.bfloat16, "bf16")
    assert common.peak_dtype("fp32") == (torch.float32, "fp32")
