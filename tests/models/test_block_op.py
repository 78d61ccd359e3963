"""A BasicBlock as one autograd op in CPU training (models/block_op.py, kernels/block.cpp): the
same bits as the block's per-op path with the same kernels, where it applies; the per-op path
wherever it does not. Needs a CPU with AMX (skipped elsewhere: the op is not used there)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.models import block_op, conv_wgrad, create_model
from reslab.models.cpu_paths import use_cpu_training_paths

CL = torch.channels_last
_OP = "BasicBlockOp"


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """The AMX kernels on these tests' small batches (conv_wgrad.usable declines fewer than 16
    images a thread, where the weight-gradient kernel measured slower)."""
    monkeypatch.setattr(conv_wgrad, "_BLOCK", 1)


@pytest.fixture(scope="module", autouse=True)
def amx():
    if not conv_wgrad.available():
        pytest.skip("the AMX kernels do not run on this CPU (built without AMX tiles)")


def _ops(t: torch.Tensor) -> dict[str, int]:
    """How many nodes of each kind t's autograd graph has."""
    seen: dict[str, int] = {}
    stack, visited = [t.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in visited:
            continue
        visited.add(f)
        name = _OP if _OP in f.name() else f.name()
        seen[name] = seen.get(name, 0) + 1
        stack.extend(g for g, _ in f.next_functions)
    return seen


def _train(model: nn.Module, x, y, *, steps: int, enabled: bool, monkeypatch, autocast=True):
    """(last output, every parameter's gradient at each step, state_dict, op count) of `steps`
    SGD steps with the block op on or off."""
    monkeypatch.setattr(block_op, "ENABLED", enabled)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    grads, n_ops = [], 0
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
        n_ops = _ops(out).get(_OP, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return out.detach(), grads, state, n_ops


@pytest.mark.parametrize(
    ("name", "shortcut", "blocks"),
    # every stride-1 block of equal widths, and every stride-2 one whose shortcut is option A's
    # (or absent): all 9 in the CIFAR nets (2 are stage transitions); in ResNet-18 layer1's two
    # and layer2's second (layer3-4: 256-512 channels, above the kernels'), with option A
    # layer2's first too (B projects it)
    [("resnet20", "A", 9), ("plain20", "A", 9), ("resnet18", "B", 3), ("resnet18", "A", 4)],
)
def test_training_steps_are_the_per_op_path_s_bits(name, shortcut, blocks, monkeypatch):
    """Three SGD steps of a whole model: the outputs, every gradient of every step, the weights
    and the running statistics after are the per-op path's bit for bit (the op counted)."""
    torch.manual_seed(0)
    base = create_model(name, num_classes=10, shortcut=shortcut).to(memory_format=CL)
    use_cpu_training_paths(base, precision="bf16")
    side = 32 if name != "resnet18" else 64
    x = torch.randn(16, 3, side, side).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))
    ref = _train(copy.deepcopy(base), x, y, steps=3, enabled=False, monkeypatch=monkeypatch)
    got = _train(copy.deepcopy(base), x, y, steps=3, enabled=True, monkeypatch=monkeypatch)
    assert ref[3] == 0 and got[3] == blocks
    assert torch.equal(got[0], ref[0])
    for step_ref, step_got in zip(ref[1], got[1]):
        for n, g in step_ref.items():
            assert torch.equal(step_got[n], g), n
    for k, v in ref[2].items():
        assert torch.equal(got[2][k], v), k


@pytest.mark.parametrize("which", ["layer1.1", "layer2.0"])  # stride 1, and 2 with option A
def test_a_bf16_model_without_autocast_and_an_input_without_gradient(which, monkeypatch):
    """Weights stored in bf16 (no autocast: the op takes them as they are and gives bf16
    gradients), and a block input that needs no gradient (the op skips x's): the per-op bits."""
    torch.manual_seed(1)
    block = create_model("resnet20", num_classes=10).get_submodule(which).to(memory_format=CL)
    block = block.to(torch.bfloat16)
    for bn in (block.bn1, block.bn2):  # the fused BN keeps fp32 parameters (as autocast does)
        bn.float()
    use_cpu_training_paths(block, precision="bf16")
    x = torch.randn(8, 16, 12, 12).bfloat16().contiguous(memory_format=CL)

    def run(enabled: bool, needs_grad: bool):
        monkeypatch.setattr(block_op, "ENABLED", enabled)
        m = copy.deepcopy(block)
        xi = x.clone().requires_grad_(needs_grad)
        out = m(xi)
        assert (_OP in _ops(out)) == enabled
        out.float().square().mean().backward()
        grads = [p.grad for p in m.parameters()]
        return out, grads, xi.grad, m.state_dict()

    for needs_grad in (True, False):
        ref, got = run(False, needs_grad), run(True, needs_grad)
        assert torch.equal(got[0], ref[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
        assert got[1][0].dtype == torch.bfloat16
        assert (got[2] is None) == (not needs_grad)
        if needs_grad:
            assert torch.equal(got[2], ref[2])
        assert all(torch.equal(got[3][k], v) for k, v in ref[3].items())


def _block(**kw) -> nn.Module:
    torch.manual_seed(0)
    block = create_model("resnet20", num_classes=10, **kw).layer1[1].to(memory_format=CL)
    use_cpu_training_paths(block, precision="bf16")
    return block


def _x(c: int = 16, n: int = 4, side: int = 8, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(n, c, side, side).to(dtype).contiguous(memory_format=CL)


def _op(block: nn.Module, x: torch.Tensor, autocast: bool = True):
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return block_op.forward(block, x)


def test_where_it_applies_and_where_the_block_takes_its_own_path(monkeypatch):
    """None (the per-op path) for everything the op does not compute as the block would."""
    block, x = _block(), _x()
    assert _op(block, x) is not None
    assert _op(block, x, autocast=False) is None  # fp32 weights, bf16 x, no autocast
    assert _op(block, x.float()) is None  # autocast would cast x: left to the convs
    assert _op(block, x.contiguous()) is None  # not channels_last
    assert _op(block, _x(side=7)) is None  # odd width: not the kernels'
    with torch.no_grad():
        assert _op(block, x) is None
    block.eval()
    assert _op(block, x) is None
    block.train()
    block.bn2.momentum = None  # a cumulative average: not the fused kernel's
    assert _op(block, x) is None
    block = _block()
    block.conv1.weight.requires_grad_(False)
    assert _op(block, x) is None
    block = _block()
    handle = block.conv2.register_forward_hook(lambda *a: None)  # the op would not call it
    assert _op(block, x) is None
    handle.remove()
    assert _op(block, x) is not None
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert _op(block, x) is None
    finally:
        handle.remove()
    monkeypatch.setattr(block_op, "ENABLED", False)
    assert _op(block, x) is None
    monkeypatch.setattr(block_op, "ENABLED", True)
    monkeypatch.setattr(conv_wgrad, "FORWARD_KERNEL", False)
    assert _op(block, x) is None


def test_transition_blocks_take_it_with_option_a_and_projection_shortcuts_never():
    """A stage's first block (stride 2, 16 -> 32 channels) with option A's shortcut or none is
    the op; option B/C's projections never are, nor anything the op does not compute as the
    block would (sides whose halves are odd, a hooked shortcut)."""
    x = _x()
    for option in ("A", "B", "C"):
        torch.manual_seed(0)
        m = create_model("resnet20", num_classes=10, shortcut=option).to(memory_format=CL)
        use_cpu_training_paths(m, precision="bf16")
        transition = _op(m.layer2[0], _x(16, side=16))
        assert (transition is None) == (option != "A")
        assert (_op(m.layer1[1], x) is None) == (option == "C")  # C projects every shortcut
    m = create_model("plain20", num_classes=10).to(memory_format=CL)
    use_cpu_training_paths(m, precision="bf16")
    assert _op(m.layer2[0], _x(16, side=16)) is not None  # no shortcut at all
    m = create_model("resnet20", num_classes=10).to(memory_format=CL)
    use_cpu_training_paths(m, precision="bf16")
    out = _op(m.layer2[0], _x(16, side=16))
    assert out is not None and out.shape == (4, 32, 8, 8)
    assert _op(m.layer2[0], _x(16, side=14)) is None  # conv2's width 7: odd
    assert _op(m.layer2[0], _x(16, side=15)) is None  # odd sides: not the kernels' stride 2
    assert _op(m.layer2[0], _x(32, side=16)) is None  # 32 channels in: not this block
    handle = m.layer2[0].downsample.register_forward_hook(lambda *a: None)
    assert _op(m.layer2[0], _x(16, side=16)) is None  # the op would not call the shortcut
    handle.remove()
    assert _op(m.layer2[0], _x(16, side=16)) is not None


def test_a_gradient_of_a_gradient_is_refused_with_a_clear_message():
    """create_graph=True would need the block's second derivatives, which its kernels do not
    give: one clear error, never a silently incomplete gradient."""
    block, x = _block(), _x().requires_grad_()
    out = _op(block, x)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*fused_bn_act: false"):
        torch.autograd.grad(out.float().sum(), x, create_graph=True)


@pytest.mark.parametrize(("fused", "tiled"), [(True, True), (True, False), (False, True)])
def test_the_run_banner_says_so_only_with_both_paths(fused, tiled):
    _, wgrad = use_cpu_training_paths(
        create_model("resnet20"), precision="bf16", fused_bn_act=fused, tiled_wgrad=tiled
    )
    assert (wgrad is not None and wgrad.endswith("as one op")) == (fused and tiled)
