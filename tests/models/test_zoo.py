"""Every registered model, checked the way timm checks its zoo; counts against the paper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab.analysis.complexity import count_macs, count_params
from reslab.models import model_info
from reslab.models.registry import ModelInfo, register_model

# The 1202-layer net is checked for counts below; its forward/backward is slow on 2 cores.
FAST = [n for n in reslab.list_models() if n != "resnet1202"]


@pytest.mark.parametrize("name", FAST)
def test_forward_backward_every_parameter_gets_gradient(name: str) -> None:
    torch.manual_seed(0)
    info = model_info(name)
    model = reslab.create_model(name, num_classes=7)
    size = info.input_size if info.family != "imagenet" else 64  # fully convolutional
    if name == "alexnet":
        size = 224
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname


# Table 6, exact counts with option A (the paper rounds them to 0.27M ... 19.4M).
@pytest.mark.parametrize(
    ("name", "exact", "paper"),
    [
        ("resnet20", 269_722, 0.27e6),
        ("resnet32", 464_154, 0.46e6),
        ("resnet44", 658_586, 0.66e6),
        ("resnet56", 853_018, 0.85e6),
        ("resnet110", 1_727_962, 1.7e6),
        ("resnet1202", 19_421_274, 19.4e6),
    ],
)
def test_cifar_parameter_counts_table6(name: str, exact: int, paper: float) -> None:
    n = count_params(reslab.create_model(name))
    assert n == exact
    digits = 1 if paper >= 1e6 and name in ("resnet110", "resnet1202") else 2
    assert round(n / 1e6, digits) == round(paper / 1e6, digits)
    assert model_info(name).paper_params == paper


@pytest.mark.parametrize(
    ("name", "paper_macs"),
    [("resnet18", 1.8e9), ("resnet34", 3.6e9), ("resnet50", 3.8e9), ("resnet101", 7.6e9),
     ("resnet152", 11.3e9)],
)  # fmt: skip
def test_imagenet_multiply_adds_table1(name: str, paper_macs: float) -> None:
    macs = count_macs(reslab.create_model(name), 224)
    assert abs(macs - paper_macs) / paper_macs < 0.03


def test_resnet50_v1_and_v15_figures() -> None:
    v1 = reslab.create_model("resnet50")
    v15 = reslab.create_model("resnet50", stride_in_3x3=True)
    assert count_params(v1) == count_params(v15) == 25_557_032
    assert round(count_macs(v1, 224) / 1e9, 2) == 3.86
    assert round(count_macs(v15, 224) / 1e9, 2) == 4.09


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_torchvision_state_dict_loads_strict_and_matches(depth: int) -> None:
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(depth)
    ref = getattr(tv, f"resnet{depth}")(weights=None).eval()
    ours = reslab.create_model(f"resnet{depth}", stride_in_3x3=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_shortcut_options_parameters() -> None:
    a = count_params(reslab.create_model("resnet34", shortcut="A"))
    b = count_params(reslab.create_model("resnet34", shortcut="B"))
    c = count_params(reslab.create_model("resnet34", shortcut="C"))
    plain = count_params(reslab.create_model("plain34"))
    assert a == plain  # option A adds no parameters
    assert a < b < c
    assert count_params(reslab.create_model("resnet20", shortcut="A")) == count_params(
        reslab.create_model("plain20")
    )


@pytest.mark.parametrize("name", ["plain20", "plain34"])
def test_plain_nets_have_no_shortcut(name: str) -> None:
    model = reslab.create_model(name)
    blocks = [m for m in model.modules() if hasattr(m, "residual")]
    assert blocks and all(not b.residual and b.downsample is None for b in blocks)


def test_a_shortcut_option_on_a_plain_net_is_said_to_change_nothing(caplog) -> None:
    with caplog.at_level("WARNING", logger="reslab.models"):
        plain = reslab.create_model("plain20", shortcut="B")
        reslab.create_model("resnet34", shortcut="A", residual=False)
    assert [r.getMessage().split(" with ")[0] for r in caplog.records] == ["plain20", "resnet34"]
    assert "changes nothing" in caplog.records[0].getMessage()
    same = reslab.create_model("plain20")
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in same.parameters())
    caplog.clear()
    with caplog.at_level("WARNING", logger="reslab.models"):
        reslab.create_model("resnet20", shortcut="B")  # a ResNet: the option is real, no word
    assert not caplog.records


def test_plain_block_output_differs_from_residual_with_same_weights() -> None:
    torch.manual_seed(0)
    res = reslab.create_model("resnet20").eval()
    plain = reslab.create_model("resnet20", residual=False).eval()
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(res(x), plain(x))
    # Block by block: H(x) = relu(F(x) + x) with the shortcut, relu(F(x)) without (section 3.1).
    h = torch.randn(2, 16, 32, 32)
    rb, pb = res.layer1[0], plain.layer1[0]
    f = rb.bn2(rb.conv2(torch.relu(rb.bn1(rb.conv1(h)))))  # F(x) [2, 16, 32, 32]
    torch.testing.assert_close(rb(h), torch.relu(f + h), rtol=0, atol=1e-6)
    torch.testing.assert_close(pb(h), torch.relu(f), rtol=0, atol=1e-6)


def test_option_a_shortcut_is_subsample_and_zero_pad() -> None:
    from reslab.models.layers import PadShortcut

    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_option_a_gradient_matches_slicing_and_keeps_the_layout(fmt) -> None:
    """The shortcut's backward is its own (layers._SubsamplePad): the same gradient as autograd
    through x[:, :, ::2, ::2] and F.pad, in x's memory format (an NCHW gradient for a
    channels_last net cost a layout copy every step)."""
    from reslab.models.layers import PadShortcut

    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(2, 32, 4, 4)
    y = PadShortcut(16, 32, 2)(x)
    assert y.is_contiguous(memory_format=fmt)
    (dx,) = torch.autograd.grad(y, x, g)
    ref = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    (dref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(y, ref) and torch.equal(dx, dref)
    assert dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("grad", [True, False])
def test_grouped_option_a_pads_each_member_and_keeps_the_layout(fmt, grad) -> None:
    """K nets fused into one (models/fused.py) pad each member's channel group: the result and
    its gradient equal padding each group alone, in x's memory format with or without autograd."""
    from reslab.models.layers import subsample_pad

    x = torch.randn(2, 3 * 16, 8, 8).contiguous(memory_format=fmt).requires_grad_(grad)
    y = subsample_pad(x, 2, 8, 8, groups=3)
    ref = torch.cat([torch.nn.functional.pad(x[:, 16 * i : 16 * (i + 1), ::2, ::2],
                                             (0, 0, 0, 0, 8, 8)) for i in range(3)], 1)  # fmt: skip
    assert y.shape == (2, 96, 4, 4) and torch.equal(y, ref)
    assert y.is_contiguous(memory_format=fmt)
    if grad:
        g = torch.randn(2, 96, 4, 4)
        (dx,) = torch.autograd.grad(y, x, g)
        (dref,) = torch.autograd.grad(ref, x, g)
        assert torch.equal(dx, dref) and dx.is_contiguous(memory_format=fmt)


def test_any_6n_plus_2_depth_and_bad_depth() -> None:
    from reslab.models.cifar import cifar_resnet

    assert cifar_resnet(depth=8)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth=21)


def test_registry_refuses_duplicates_and_unknown_names() -> None:
    info = model_info("resnet20")
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelInfo("resnet20", info.builder, "cifar", 20, 32))
    with pytest.raises(KeyError, match="reslab models"):
        reslab.create_model("resnet21")


def test_zero_init_residual() -> None:
    m = reslab.create_model("resnet50", zero_init_residual=True)
    assert all((b.bn3.weight == 0).all() for b in m.modules() if hasattr(b, "bn3"))


def test_lrn_matches_alexnet_formula() -> None:
    from reslab.models.layers import LocalResponseNorm

    torch.manual_seed(0)
    a = torch.randn(2, 11, 4, 4) * 10
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expect = torch.empty_like(a)
    for i in range(a.shape[1]):
        lo, hi = max(0, i - n // 2), min(a.shape[1] - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(1)
        expect[:, i] = a[:, i] / (k + alpha * s) ** beta
    torch.testing.assert_close(LocalResponseNorm()(a), expect)


def test_alexnet_options() -> None:
    m = reslab.create_model("alexnet", activation="tanh", lrn=False, overlap_pool=False, dropout=0)
    assert isinstance(m.act, nn.Tanh)
    assert isinstance(m.lrn, nn.Identity) and m.pool.kernel_size == 2
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    one = count_params(reslab.create_model("alexnet", towers=1))
    two = count_params(reslab.create_model("alexnet", towers=2))
    assert two < one  # towers cut the conv2/4/5 connections, as the two-GPU net does


def test_alexnet_towers_equal_grouped_convolution() -> None:
    """Tower 2's conv2 sees only its own 48 channels: exactly a groups=2 conv."""
    torch.manual_seed(0)
    m = reslab.create_model("alexnet").eval()
    x = [torch.randn(1, 48, 27, 27), torch.randn(1, 48, 27, 27)]
    towers = torch.cat(m.conv2(x), 1)
    w = torch.cat([t.weight for t in m.conv2.towers])
    b = torch.cat([t.bias for t in m.conv2.towers])
    grouped = torch.nn.functional.conv2d(torch.cat(x, 1), w, b, padding=2, groups=2)
    torch.testing.assert_close(towers, grouped)


def test_alexnet_place_towers_on_devices() -> None:
    from reslab.models.alexnet import place_towers

    m = place_towers(reslab.create_model("alexnet").eval(), ["cpu", "cpu"])
    assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match="devices"):
        place_towers(m, ["cpu"])


def test_models_cli_prints_paper_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from reslab.cli import main

    assert main(["models", "--family", "cifar"]) == 0
    out = capsys.readouterr().out
    assert "resnet110" in out and "1.73M" in out and "6.43" in out


# PAPER.md: Table 2/3 top-1 10-crop errors (ResNet-34 with option B, as the zoo builds it) and
# Table 6's CIFAR test errors, as the registry stores them for `reslab models` and reports.
PAPER_ERRORS = {
    "resnet18": 27.88, "resnet34": 24.52, "resnet50": 22.85, "resnet101": 21.75,
    "resnet152": 21.43, "plain18": 27.94, "plain34": 28.54, "resnet20": 8.75, "resnet32": 7.51,
    "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43, "resnet1202": 7.93,
}  # fmt: skip


@pytest.mark.parametrize(("name", "error"), PAPER_ERRORS.items())
def test_registry_holds_the_papers_errors(name: str, error: float) -> None:
    assert model_info(name).paper_error == error


def test_alexnet_is_the_notes_net() -> None:
    """3x3/2 overlapping pools, dropout 0.5 on the first two fc layers, 55/27/13/6 maps from a
    224 input, about 60M parameters (two towers)."""
    m = reslab.create_model("alexnet").eval()
    assert (m.pool.kernel_size, m.pool.stride) == (3, 2)
    assert isinstance(m.drop, nn.Dropout) and m.drop.p == 0.5
    dropped, sizes = [], []
    hooks = [m.drop.register_forward_hook(lambda _m, i, _o: dropped.append(i[0].shape[1]))]
    hooks += [mod.register_forward_hook(lambda _m, _i, o: sizes.append(o))
              for mod in (m.conv1, m.conv2, m.conv5)]  # fmt: skip
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    side = [(o[0] if isinstance(o, (list, tuple)) else o).shape[-1] for o in sizes]
    assert side == [55, 27, 13]
    assert dropped == [2048, 2048, 2048, 2048]  # fc6 and fc7 outputs, per tower; not fc8's
    assert m.pool(torch.zeros(1, 1, 13, 13)).shape[-1] == 6  # conv5's maps pooled to 6x6
    assert count_params(m) == 60_965_224


def test_alexnet_lrn_follows_relu_of_conv1_and_conv2_only_then_pools() -> None:
    """PAPER.md: LRN after ReLU, after conv1 and conv2; overlapping max pools follow both LRN
    layers and conv5. Recorded as the order the shared act/lrn/pool modules run in."""
    m = reslab.create_model("alexnet", towers=1).eval()
    order: list[str] = []
    names = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "conv4": "conv4",
             "conv5": "conv5", "fc6": "fc6", "act": "relu", "lrn": "lrn", "pool": "pool"}  # fmt: skip
    hooks = [m.get_submodule(k).register_forward_hook(lambda *_a, v=v: order.append(v))
             for k, v in names.items()]  # fmt: skip
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert order[: order.index("fc6")] == [
        "conv1", "relu", "lrn", "pool", "conv2", "relu", "lrn", "pool",
        "conv3", "relu", "conv4", "relu", "conv5", "relu", "pool",
    ]  # fmt: skip
    lrn = m.lrn.lrn  # torch divides alpha by n: given alpha * n (PAPER.md)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 5 * 1e-4, 0.75, 2.0)
