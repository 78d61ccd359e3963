"""The fused net equals K separate nets: logits, every gradient, BN statistics.

Gradients are compared in float64, to 1e-9: in float32 any two correct implementations (even
one net in NCHW against the same net in NHWC, measured 6e-3 relative) can differ by up to ~1%
in some gradients at init, because a pre-activation within rounding of 0 lands on the other
side of a ReLU and batch statistics over a few images spread that one flipped entry. float32
forward passes (logits, running statistics) are compared to 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reslab.models.cifar import cifar_resnet
from reslab.models.fused import (
    FusedCifarNet,
    fuse_state_dicts,
    split_state_dict,
    stack_inputs,
)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def _nets(k: int, **opts: object) -> list[nn.Module]:
    nets = []
    for seed in range(k):
        torch.manual_seed(seed)
        net = cifar_resnet(depth=14, **opts)
        # Non-trivial BN affine parameters, so that a mix-up between members would show.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        nets.append(net)
    return nets


@pytest.mark.parametrize(
    "opts",
    [{"shortcut": "A"}, {"residual": False}, {"shortcut": "B"}, {"shortcut": "C"}],
    ids=["resnet-A", "plain", "resnet-B", "resnet-C"],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_separate_nets(opts: dict, channels_last: bool, dtype: torch.dtype) -> None:
    k, n, tol = 3, 6, TOL[dtype]
    nets = [m.to(dtype) for m in _nets(k, **opts)]
    fused = FusedCifarNet(copy.deepcopy(nets))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        fused = fused.to(memory_format=fmt)
        nets = [m.to(memory_format=fmt) for m in nets]
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(n, 3, 32, 32, generator=g, dtype=dtype).contiguous(memory_format=fmt)
        for _ in range(k)
    ]
    ys = [torch.randint(0, 10, (n,), generator=g) for _ in range(k)]
    ce = nn.CrossEntropyLoss()

    logits = fused(stack_inputs(xs).contiguous(memory_format=fmt))  # [K, N, 10]
    loss = sum(ce(logits[i], ys[i]) for i in range(k))
    loss.backward()
    for i, net in enumerate(nets):
        ref = net(xs[i])
        ce(ref, ys[i]).backward()
        torch.testing.assert_close(logits[i], ref, **tol)
        got = dict(fused.members[i].named_parameters())
        for name, p in net.named_parameters():
            if dtype == torch.float64:
                torch.testing.assert_close(got[name].grad, p.grad, **tol, msg=name)
        sd = fused.members[i].state_dict()
        for name, b in net.named_buffers():  # running statistics after one training batch
            torch.testing.assert_close(sd[name], b, **tol, msg=name)
    fused.eval()
    out = fused(stack_inputs(xs).contiguous(memory_format=fmt))
    for i, net in enumerate(nets):
        torch.testing.assert_close(out[i], net.eval()(xs[i]), **tol)


def test_state_dict_mapping_round_trip_and_load() -> None:
    nets = _nets(2)
    sds = [m.state_dict() for m in nets]
    back = split_state_dict(fuse_state_dicts(sds))
    for a, b in zip(sds, back, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fused = FusedCifarNet(_nets(2))  # other weights, then the first nets' loaded
    fused.load_member_state_dicts(back)
    for a, b in zip(sds, fused.member_state_dicts(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Loading copies into the members' views, so the fused forward uses the loaded statistics.
    assert torch.equal(fused._mean0[:16], sds[0]["bn1.running_mean"])
    # A member's state_dict is an ordinary single-net one.
    single = cifar_resnet(depth=14)
    single.load_state_dict(fused.member_state_dicts()[1])


def test_views_survive_to() -> None:
    fused = FusedCifarNet(_nets(2)).to(torch.float64).to(torch.float32)
    fused(torch.randn(4, 6, 32, 32))
    assert torch.equal(fused.members[1].bn1.running_mean, fused._mean0[16:])
    assert int(fused.members[0].layer3[1].bn2.num_batches_tracked) == 1


def test_rejects_mixed_members() -> None:
    with pytest.raises(ValueError, match="another architecture"):
        FusedCifarNet([cifar_resnet(depth=14), cifar_resnet(depth=8)])
    with pytest.raises(ValueError, match=r"\[N, 6, H, W\]"):
        FusedCifarNet(_nets(2))(torch.randn(2, 3, 32, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_equals_separate_nets_on_cuda() -> None:
    dev, k = torch.device("cuda"), 3
    nets = [m.to(dev, torch.float64) for m in _nets(k)]
    fused = FusedCifarNet(copy.deepcopy(nets)).to(dev)
    xs = [torch.randn(8, 3, 32, 32, device=dev, dtype=torch.float64) for _ in range(k)]
    ys = [torch.randint(0, 10, (8,), device=dev) for _ in range(k)]
    ce = nn.CrossEntropyLoss()
    logits = fused(stack_inputs(xs))
    sum(ce(logits[i], ys[i]) for i in range(k)).backward()
    for i, net in enumerate(nets):
        ce(net(xs[i]), ys[i]).backward()
        got = dict(fused.members[i].named_parameters())
        for name, p in net.named_parameters():
            torch.testing.assert_close(got[name].grad, p.grad, **TOL[torch.float64], msg=name)
