"""One process training many nets: every compiled net is compiled (torch.compile's per-function
recompile limit cannot silently leave the 9th in eager), and pool workers number themselves so
that each can take its own GPU."""

from __future__ import annotations

import multiprocessing

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter

from reslab.engine.config import TrainConfig
from reslab.experiments import runner

NETS = 10  # more than dynamo's recompile_limit (8) variants of one function


def _frames_per_net(*, reset: bool) -> list[int]:
    """Graphs compiled for each of NETS nets of distinct structure, compiled one after another in
    this process (as reproduce does), with the runner's reset before each or without."""
    torch._dynamo.reset()
    counter = CompileCounter()  # a real dynamo backend that counts the graphs it receives
    x = torch.randn(2, 4)
    frames = []
    for depth in range(1, NETS + 1):
        if reset:
            runner.fresh_compiler(TrainConfig(compile=True))
        net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(depth)))
        before = counter.frame_count
        torch.compile(net, backend=counter)(x)
        frames.append(counter.frame_count - before)
    torch._dynamo.reset()
    return frames


def test_every_net_of_a_long_plan_is_compiled() -> None:
    limit = torch._dynamo.config.recompile_limit
    assert limit < NETS  # else this test would show nothing
    assert _frames_per_net(reset=True) == [1] * NETS


def test_without_the_reset_the_limit_leaves_later_nets_in_eager() -> None:
    # The defect itself, so that the test above can fail: past the limit nothing is compiled.
    frames = _frames_per_net(reset=False)
    limit = torch._dynamo.config.recompile_limit
    assert frames[:limit] == [1] * limit and frames[limit:] == [0] * (NETS - limit)


def test_no_reset_for_eager_runs() -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(nn.Linear(4, 4), backend=counter)
    compiled(torch.randn(2, 4))
    runner.fresh_compiler(TrainConfig(compile=False))
    compiled(torch.randn(2, 4))  # its cache survived: no second compilation
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_pool_workers_number_themselves_and_keep_named_devices() -> None:
    slots = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(3):
        runner._init_worker(slots)
        seen.append(runner._WORKER_SLOT)
    runner._WORKER_SLOT = 0
    assert seen == [0, 1, 2]
    assert runner.worker_device("cpu", 5) == "cpu"
    assert runner.worker_device("cuda:1", 0) == "cuda:1"  # a GPU the user named is kept
    if not torch.cuda.is_available():
        assert runner.worker_device("auto", 3) == "auto"
