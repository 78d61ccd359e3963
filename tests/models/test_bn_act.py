"""The fused BN + (residual) + ReLU kernel against float64 batch norm, and its fallbacks."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.models import create_model
from reslab.models.bn_act import _openmp_library, bn_relu, load_kernel, usable, use_fused_bn_act

CL = torch.channels_last

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="no C++ toolchain for the kernel")


def _bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _run(bn, x, r, gy, *, fused: bool, dtype: torch.dtype):
    """relu(bn(x) + r) forward and backward in `dtype`; returns float64 copies of everything."""
    bn = bn.to(dtype) if dtype == torch.float64 else bn
    x = x.to(dtype).contiguous(memory_format=CL).requires_grad_()
    r = None if r is None else r.to(dtype).contiguous(memory_format=CL).requires_grad_()
    y = bn_relu(bn, x, r, fused=fused)
    y.backward(gy.to(dtype))
    out = {"y": y, "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
           "mean": bn.running_mean, "var": bn.running_var}  # fmt: skip
    if r is not None:
        out["dr"] = r.grad
    return {k: v.detach().double() for k, v in out.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# 16/32/64 channels run packed 64 wide; 48, 128 and an odd pixel count take the run-time-width
# loop. The last two span several 256-row chunks of fp32 sums on each thread.
SHAPES = [(8, 16, 12, 12), (8, 32, 8, 8), (4, 64, 5, 5), (3, 48, 5, 5), (3, 16, 5, 5),
          (32, 16, 32, 32), (16, 128, 9, 9)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_float64_as_closely_as_eager(shape, residual, dtype):
    """Outputs, all four gradients and the running statistics: the fused kernel's error against
    float64 is at most the eager path's own (plus a small floor), in bf16 and fp32. An input mean
    far from zero checks the shifted variance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2 + 4
    r = torch.randn(shape, generator=g) if residual else None
    gy = torch.randn(shape, generator=g)
    exact = _run(_bn(shape[1]), x, r, gy, fused=False, dtype=torch.float64)
    eager = _run(_bn(shape[1]), x, r, gy, fused=False, dtype=dtype)
    fused = _run(_bn(shape[1]), x, r, gy, fused=True, dtype=dtype)
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    for k in exact:
        assert _rel(fused[k], exact[k]) <= 1.5 * _rel(eager[k], exact[k]) + floor, k


def test_nan_propagates_as_in_eager():
    """A NaN from a diverging run must reach the loss (the trainer stops on a non-finite loss):
    relu(NaN) is NaN in torch, and the fused kernel must not turn it into 0."""
    x = torch.randn(4, 16, 6, 6)
    x[1, 3, 2, 2] = float("nan")
    r = torch.randn(4, 16, 6, 6)
    for dtype in (torch.float32, torch.bfloat16):
        xs, rs = x.to(dtype).contiguous(memory_format=CL), r.to(dtype).contiguous(memory_format=CL)
        fused = bn_relu(_bn(16), xs, rs, fused=True)
        eager = bn_relu(_bn(16), xs, rs, fused=False)
        assert torch.equal(fused.isnan(), eager.isnan()) and fused.isnan().any()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
@pytest.mark.parametrize(
    ("march", "simd"),
    [
        ("x86-64-v3", "avx2"),
        # x86 CPUs without AVX2 or non-x86 ones: slow, as a build costs 40 s of the default
        # run's 15 min on a 2-core AMD Zen 3 (whose own build is the AVX2 one)
        pytest.param("x86-64-v2", "portable", marks=pytest.mark.slow),
    ],
)
def test_the_other_vector_codes_match_float64_too(monkeypatch, march, simd):
    """The kernel has three vector codes: AVX-512, AVX2 (CPUs without AVX-512, e.g. AMD Zen 3)
    and a portable one. Each must pass the same accuracy checks: this CPU's own build runs one,
    the others are built for an older target (about 40 s to compile, cached after)."""
    from reslab.models import bn_act

    ext = load_kernel()
    if not ext.simd().startswith(simd):
        omp = bn_act._openmp_library()
        name = f"reslab_bn_act_test_{march.replace('-', '_')}" + ("_omp" if omp else "")
        ext = bn_act._build(name, march=march, openmp=omp)
    assert ext.simd().startswith(simd)
    monkeypatch.setattr(bn_act, "_EXT", ext)
    for shape in [(8, 16, 12, 12), (3, 48, 5, 5), (16, 128, 9, 9)]:
        for dtype in (torch.float32, torch.bfloat16):
            test_fused_matches_float64_as_closely_as_eager(shape, True, dtype)
            test_fused_matches_float64_as_closely_as_eager(shape, False, dtype)
    test_nan_propagates_as_in_eager()
    for dtype in (torch.float32, torch.bfloat16):
        test_the_kernels_add_is_torchs_add_bit_for_bit(dtype)
    for momentum in (0.1, 0.9):
        test_running_statistics_are_updated_by_the_kernel_as_torch_lerp_does(
            16, torch.bfloat16, momentum
        )


@pytest.mark.skipif(
    _openmp_library() is None,
    reason="torch here does not run on a GNU OpenMP runtime the kernel can share",
)
def test_the_kernel_runs_on_torchs_threads_and_only_its_openmp_runtime():
    """Sessions 15-19 shipped the kernel compiled without -fopenmp: ATen's parallel_for then ran
    every loop on one thread (half this 2-core machine). It must use as many threads as torch,
    from the one OpenMP runtime torch loaded (a second one can deadlock)."""
    ext = load_kernel()
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert ext.threads() == n
    finally:
        torch.set_num_threads(old)
    with open("/proc/self/maps", encoding="utf-8") as f:
        gomp = {ln.split()[-1] for ln in f if "libgomp" in ln}
    assert len(gomp) == 1, gomp


def test_a_compiler_without_openmp_still_gives_the_kernel(monkeypatch):
    """Where the OpenMP build fails, the same kernel is built for one thread, not the eager path."""
    from reslab.models import bn_act

    calls = []

    def build(name, *, march, openmp=None):
        calls.append((name, openmp))
        if openmp:
            raise RuntimeError("error: unsupported option '-fopenmp'")
        return types.SimpleNamespace(simd=lambda: "portable", threads=lambda: 1)

    monkeypatch.setattr(bn_act, "_EXT", None)
    monkeypatch.setattr(bn_act, "_FAILED", None)
    monkeypatch.setattr(bn_act, "_openmp_library", lambda: "/lib/libgomp.so.1")
    monkeypatch.setattr(bn_act, "_build", build)
    monkeypatch.delenv("RESLAB_BN_KERNEL", raising=False)
    assert bn_act.load_kernel() is not None
    assert calls == [(bn_act._kernel_name("/lib/libgomp.so.1"), "/lib/libgomp.so.1"),
                     (bn_act._kernel_name(None), None)]  # fmt: skip
    assert bn_act.kernel_status() == "fused kernel, portable, 1 thread"


def test_repeated_calls_give_identical_results():
    """The channel sums are split into parts by rows, not by whichever thread came first."""
    x = torch.randn(32, 16, 32, 32).bfloat16().contiguous(memory_format=CL).requires_grad_()
    gy = torch.randn(32, 16, 32, 32).bfloat16()
    outs = []
    for _ in range(2):
        bn = _bn(16)
        y = bn_relu(bn, x, fused=True)
        (gx,) = torch.autograd.grad(y, x, gy)
        outs.append((y, gx, bn.running_var.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_running_statistics_and_counter_follow_torch():
    bn_f, bn_e = _bn(16), _bn(16)
    x = (torch.randn(4, 16, 6, 6) * 3 + 1).contiguous(memory_format=CL)
    for _ in range(3):
        bn_relu(bn_f, x, fused=True)
        bn_relu(bn_e, x, fused=False)
    torch.testing.assert_close(bn_f.running_mean, bn_e.running_mean)
    torch.testing.assert_close(bn_f.running_var, bn_e.running_var)
    assert bn_f.num_batches_tracked.item() == bn_e.num_batches_tracked.item() == 3


@pytest.mark.parametrize(("c", "dtype"), [(16, torch.bfloat16), (48, torch.float32)])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.9, 1.0])
def test_running_statistics_are_updated_by_the_kernel_as_torch_lerp_does(c, dtype, momentum):
    """The kernel updates the running statistics and the counter in place: bit for bit the values
    of torch's lerp_ with the unbiased batch variance (the ops it replaces), whose vector code
    anchors weights from 0.5 up at the other end; torch's no-FMA build may differ by an ulp."""
    bn_k, bn_t = _bn(c), _bn(c)
    bn_k.momentum = bn_t.momentum = momentum
    exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    ext = load_kernel()
    for i in range(4):
        x = (torch.randn(8, c, 6, 6) * 2 + i).to(dtype).contiguous(memory_format=CL)
        bn_relu(bn_k, x, fused=True)
        _, _, mean, var, _ = ext.forward(x, None, bn_t.weight, bn_t.bias,
                                         bn_t.running_mean.clone(), bn_t.eps)  # fmt: skip
        m = x.numel() // c
        with torch.no_grad():
            bn_t.running_mean.lerp_(mean, bn_t.momentum)
            bn_t.running_var.lerp_(var * (m / (m - 1)), bn_t.momentum)
            bn_t.num_batches_tracked.add_(1)
        for got, want in ((bn_k.running_mean, bn_t.running_mean),
                          (bn_k.running_var, bn_t.running_var)):  # fmt: skip
            if exact:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=3e-7, atol=1e-7)
    assert bn_k.num_batches_tracked.item() == 4


def test_the_kernel_is_taken_only_where_it_applies():
    bn = _bn(16)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    assert usable(bn, x, None)
    assert not usable(bn, x.contiguous(), None)  # NCHW
    assert not usable(_bn(8), torch.randn(2, 8, 4, 4).contiguous(memory_format=CL), None)  # 8 ch
    assert not usable(bn, x.double(), None)
    assert not usable(bn, x, torch.randn(2, 16, 4, 4).double().contiguous(memory_format=CL))
    assert not usable(_bn(16).bfloat16(), x.bfloat16(), None)  # BN parameters not fp32
    bn.eval()
    assert not usable(bn, x, None)  # eval mode: running statistics, the eager path
    bn.train()
    bn.momentum = None  # cumulative average: eager
    assert not usable(bn, x, None)
    bn = _bn(16)
    bn.running_var = bn.running_var.double()  # statistics the kernel cannot update in place
    assert not usable(bn, x, None)
    bn = _bn(16)
    bn.running_mean = torch.zeros(32)[::2]  # not contiguous
    assert not usable(bn, x, None)


def test_eval_mode_output_is_the_eager_one_exactly():
    bn = _bn(32).eval()
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=CL)
    r = torch.randn(2, 32, 4, 4).contiguous(memory_format=CL)
    assert torch.equal(bn_relu(bn, x, r, fused=True), F.relu(bn(x) + r))


def _grads(model, x, y, *, bf16: bool, fused: bool) -> dict[str, torch.Tensor]:
    use_fused_bn_act(model, fused)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18"])
def test_a_training_step_with_the_kernel_matches_the_eager_one(name):
    """Whole models (option A pad shortcut, plain twin, ImageNet BasicBlocks with option B):
    every parameter gets a finite gradient, in fp32 the gradients are the eager ones, and in
    bf16 they are no further from the fp32 gradients than eager bf16's own (at initialisation,
    one step: ~10% for ResNet-20 either way)."""
    torch.manual_seed(0)
    size = 32 if name != "resnet18" else 64
    base = create_model(name, num_classes=10).to(memory_format=CL)
    x = torch.randn(16, 3, size, size).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))

    def grads(bf16: bool, fused: bool) -> torch.Tensor:
        m = create_model(name, num_classes=10).to(memory_format=CL)
        m.load_state_dict(base.state_dict())
        g = _grads(m, x, y, bf16=bf16, fused=fused)
        assert all(torch.isfinite(v).all() for v in g.values())
        return torch.cat([v.flatten() for v in g.values()])

    ref = grads(False, False)
    # fp32: the kernel sums in another order, and 20 layers amplify that (up to ~1.5% measured).
    assert _rel(grads(False, True), ref) < 0.05
    if name != "plain20":  # a plain net's bf16 gradients are ~70% off fp32's either way
        assert _rel(grads(True, True), ref) <= 1.5 * _rel(grads(True, False), ref) + 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernels_add_is_torchs_add_bit_for_bit(dtype):
    """Values over 60 decades (fp32's subnormals and overflow to inf included), nan, infinities
    and signed zeros; bf16 rounds to nearest even as torch does."""
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-44, 38, 81).view(1, 1, 9, 9)
    a = (torch.randn(16, 16, 9, 9, generator=g) * scale).to(dtype).contiguous(memory_format=CL)
    b = (torch.randn(16, 16, 9, 9, generator=g) * scale.flip(-1)).to(dtype)
    b = b.contiguous(memory_format=CL)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -0.0])
    a[0, :6, 0, 0] = specials.to(dtype)
    b[0, :6, 0, 0] = specials.flip(0).to(dtype)
    out = load_kernel().add(a, b)
    assert out.is_contiguous(memory_format=CL)
    want = a + b
    assert want.isnan().any() and torch.equal(out.isnan(), want.isnan())
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(out.view(bits), want.view(bits))  # NaN's bit pattern too
    else:  # torch's scalar conversion writes NaN otherwise (0x7FC0)
        assert torch.equal(out.nan_to_num(0.5).view(bits), want.nan_to_num(0.5).view(bits))


def _fork_count(loss: torch.Tensor) -> int:
    """How many _Fork nodes the loss's graph holds."""
    seen, todo, n = set(), [loss.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += type(fn).__name__ == "_ForkBackward"
        todo += [nxt for nxt, _ in fn.next_functions]
    return n


@pytest.mark.parametrize(("name", "forks"), [("resnet20", 7), ("resnet18", 5), ("resnet50", 12)])
@pytest.mark.parametrize("bf16", [False, True])
def test_identity_shortcuts_gradients_summed_by_the_kernel_are_the_same_bits(
    name, forks, bf16, monkeypatch
):
    """Every identity block's input gradient (shortcut + first conv) is summed by the kernel's
    add in a fused training step, and every parameter's gradient is bit for bit the one that
    autograd's own sum gives."""
    from reslab.models import blocks

    torch.manual_seed(0)
    size = 32 if name == "resnet20" else 64
    base = create_model(name, num_classes=10).to(memory_format=CL)
    x = torch.randn(4, 3, size, size).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))

    def step() -> tuple[int, torch.Tensor]:
        m = create_model(name, num_classes=10).to(memory_format=CL)
        m.load_state_dict(base.state_dict())
        use_fused_bn_act(m)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(m(x), y)
        n = _fork_count(loss)
        loss.backward()
        return n, torch.cat([p.grad.flatten().float() for p in m.parameters()])

    n, with_fork = step()
    assert n == forks
    monkeypatch.setattr(blocks, "fork_for_shortcut", lambda t: (t, t))
    n, without = step()
    assert n == 0
    assert torch.equal(with_fork, without)


def test_second_order_gradients_through_a_fork_stay_in_the_graph(monkeypatch):
    """create_graph=True (an input-gradient penalty): the fork's sum is autograd's then, so the
    penalty's parameter gradients are those without the fork."""
    from reslab.models import blocks

    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=10).to(memory_format=CL)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))

    def penalty_grads() -> torch.Tensor:
        m = create_model("resnet20", num_classes=10).to(memory_format=CL)
        m.load_state_dict(base.state_dict())
        use_fused_bn_act(m)
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(F.cross_entropy(m(xi), y), xi, create_graph=True)
        gx.square().sum().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    with_fork = penalty_grads()
    monkeypatch.setattr(blocks, "fork_for_shortcut", lambda t: (t, t))
    assert torch.equal(with_fork, penalty_grads())


@pytest.mark.filterwarnings("ignore:`torch.jit")  # torch's own, from inside these transforms
def test_no_fork_in_eval_mode_or_where_hooks_could_see_conv1s_input():
    """The fork is for training (the kernel's BN runs only there): in eval mode a fused-flag
    model keeps working under torch.func, fx and forward-mode AD as an unflagged one; a hook on
    conv1 may modify its input in place, as without the flag."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=10).to(memory_format=CL).eval()
    use_fused_bn_act(m)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (2,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = dict(m.named_buffers())
    g = grad(lambda p: F.cross_entropy(functional_call(m, (p, buffers), (x,)), y))(params)
    assert set(g) == set(params)
    with fwAD.dual_level():
        out = m(fwAD.make_dual(x, torch.ones_like(x)))
        assert fwAD.unpack_dual(out).tangent is not None
    torch.fx.symbolic_trace(m)
    m.train()
    xi = x.clone().requires_grad_()
    assert _fork_count(m(xi).sum()) == 5  # resnet18: identity blocks everywhere but 3 stages
    m.layer1[1].conv1.register_forward_pre_hook(lambda mod, inp: inp[0].clamp_(-3, 3))
    loss = m(xi).sum()
    assert _fork_count(loss) == 4  # the hooked block keeps autograd's sum
    loss.backward()


def test_a_fork_is_made_only_where_the_kernel_sums(monkeypatch):
    from reslab.models.bn_act import _Fork, fork_for_shortcut

    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL).requires_grad_()
    a, b = fork_for_shortcut(x)
    assert a is not x and b is not x and a.data_ptr() == b.data_ptr() == x.data_ptr()
    for t in (x.detach(), x.contiguous(), x.double(), x[:, :8]):
        pair = fork_for_shortcut(t)
        assert pair[0] is t and pair[1] is t
    with torch.no_grad():
        assert fork_for_shortcut(x)[0] is x
    # One of the two views unused: its gradient is None and the other passes through.
    a, _ = _Fork.apply(x)
    (g,) = torch.autograd.grad(a.sum() * 2, x)
    assert torch.equal(g, torch.full_like(x, 2.0))
    # Gradients in another layout than the kernel's: autograd's sum.
    a, b = _Fork.apply(x)
    (g,) = torch.autograd.grad((a.contiguous() * b.contiguous()).sum(), x)
    assert torch.allclose(g, 2 * x)


@pytest.mark.parametrize(("name", "n"), [("resnet20", 10), ("resnet18", 9), ("resnet50", 17)])
def test_every_block_and_the_stem_take_the_flag(name, n):
    """Blocks plus the stem's relu(bn1(conv1)) (the largest activation of an ImageNet net)."""
    assert use_fused_bn_act(create_model(name)) == n


def test_switched_off_by_environment_without_a_warning():
    code = (
        "import warnings; warnings.simplefilter('error');"
        "from reslab.models.bn_act import load_kernel, kernel_status;"
        "assert load_kernel() is None; print(kernel_status())"
    )
    env = {**os.environ, "RESLAB_BN_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    assert "RESLAB_BN_KERNEL=0" in out.stdout


def test_a_dead_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    """torch waits for as long as its build lock exists; one left by a killed build would hang
    every later run."""
    from reslab.models.bn_act import _clear_stale_lock

    lock = tmp_path / "lock"
    lock.write_text("")
    _clear_stale_lock(str(lock))
    assert lock.exists()  # fresh: another process may be building right now
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale kernel build lock"):
        _clear_stale_lock(str(lock))
    assert not lock.exists()


def test_the_kernel_loads_past_an_old_lock_file_without_a_warning():
    """torch 2.14 keeps its build lock file and locks it with the OS: an old file is no sign of a
    dead build, and removing it (with a warning on every run) would let two builds race. Under
    an existence-blocking torch the old file is a dead build's and goes, with one warning."""
    from reslab.models.bn_act import _lock_file_blocks

    code = (
        "import os, time, warnings;"
        "from reslab.models import bn_act;"
        "name = bn_act._kernel_name(bn_act._openmp_library());"
        "lock = os.path.join(bn_act._build_dir(name), 'lock');"
        "os.makedirs(os.path.dirname(lock), exist_ok=True); open(lock, 'a').close();"
        "old = time.time() - 3600; os.utime(lock, (old, old));"
        "ws = warnings.catch_warnings(record=True); seen = ws.__enter__();"
        "warnings.simplefilter('always'); ext = bn_act.load_kernel(); ws.__exit__(None, None, None);"
        "print(ext is not None, os.path.exists(lock), [str(w.message) for w in seen])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, lock_left, said = out.stdout.strip().split(" ", 2)
    assert loaded == "True"
    if _lock_file_blocks():  # the dead build's lock is gone (torch's own is removed after use)
        assert lock_left == "False" and "stale kernel build lock" in said
    else:  # the file is left for torch's OS lock, and nothing is said
        assert lock_left == "True" and said == "[]", said


def test_builds_are_kept_apart_per_torch_python_and_install(monkeypatch, tmp_path):
    """One home directory can serve environments with different torch versions (the GPU image's
    2.11 beside 2.14): each gets its own build directory, so no build made against one torch's
    headers is loaded by another, and 2.14's kept lock file never meets 2.11's clean-up. So does
    another install of reslab (a checkout beside a site-packages copy): sharing one, each would
    recompile over the other at every switch. TORCH_EXTENSIONS_DIR moves them, as torch's own."""
    from reslab.models import bn_act

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = bn_act._build_dir("reslab_bn_act_x")
    assert here == bn_act._build_dir("reslab_bn_act_x")
    assert os.path.basename(here).startswith("reslab_bn_act_x_")
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", torch.__version__ + ".other")
        other_torch = bn_act._build_dir("reslab_bn_act_x")
    with monkeypatch.context() as m:
        m.setattr(bn_act, "sys", types.SimpleNamespace(version_info=(3, 99, 0)))
        other_python = bn_act._build_dir("reslab_bn_act_x")
    with monkeypatch.context() as m:
        m.setattr(bn_act, "_kernels_dir", lambda: str(tmp_path / "other-checkout"))
        other_install = bn_act._build_dir("reslab_bn_act_x")
    with monkeypatch.context() as m:
        m.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
        other_venv = bn_act._build_dir("reslab_bn_act_x")
    assert len({here, other_torch, other_python, other_install, other_venv}) == 5
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    moved = bn_act._build_dir("reslab_bn_act_x")
    assert moved == str(tmp_path / "ext" / os.path.basename(here))


def test_a_compile_is_known_ahead_and_announced_once(monkeypatch, tmp_path):
    """Compiling the kernels takes tens of seconds: `kernel_needs_build` tells it ahead (no build
    cached for this CPU and environment), and a run's CPU paths announce it before they build."""
    from reslab.models import bn_act, cpu_paths

    load_kernel()  # a build where this environment keeps it: nothing to compile there
    assert not bn_act.kernel_needs_build()
    monkeypatch.setattr(bn_act, "_EXT", None)  # as in a new process...
    assert not bn_act.kernel_needs_build()  # ...that finds the cached build
    said: list[str] = []
    monkeypatch.setattr(cpu_paths, "load_kernel", lambda: None)  # no 40 s build in this test
    model = create_model("resnet20")
    with monkeypatch.context() as m:
        m.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache
        assert bn_act.kernel_needs_build()
        m.setenv("RESLAB_BN_KERNEL", "0")
        assert not bn_act.kernel_needs_build()  # turned off: nothing will be built
        m.delenv("RESLAB_BN_KERNEL")
        cpu_paths.use_cpu_training_paths(model, precision="fp32", announce=said.append)
        assert len(said) == 1 and said[0].startswith("compiling the CPU kernels")
        cpu_paths.use_cpu_training_paths(model, precision="fp32", announce=said.append,
                                         fused_bn_act=False)  # fmt: skip
    cpu_paths.use_cpu_training_paths(model, precision="fp32", announce=said.append)
    assert len(said) == 1  # the kernel off, or its build cached: nothing said


@pytest.mark.slow
def test_a_cold_cache_run_says_it_compiles_then_a_second_run_does_not(tmp_path, cifar_root):
    """The whole path in real processes, on an empty TORCH_EXTENSIONS_DIR: one line before the
    banner while the kernels compile (about 40 s on 2 cores), none the next time."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    outs = []
    for run in ("a", "b"):
        cmd = [sys.executable, "-m", "reslab", "train", "--data", str(cifar_root), "--iters", "1",
               "--set", "eval_every=100000", "--out", str(tmp_path / run)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stderr)
    assert outs[0].count("compiling the CPU kernels") == 1
    assert outs[0].index("compiling the CPU kernels") < outs[0].index("BN+ReLU    fused kernel")
    assert "compiling" not in outs[1] and "BN+ReLU    fused kernel" in outs[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is logged only without CUDA")
def test_kernel_loads_without_torchs_no_cuda_runtime_warning(tmp_path) -> None:
    """A CUDA build of torch on a machine without a GPU logs "No CUDA runtime is found" when
    torch.utils.cpp_extension is imported and CUDA_HOME points somewhere; the kernel is CPU code,
    and that line opened every CPU run's output."""
    code = (
        "from reslab.models.bn_act import load_kernel\n"
        "load_kernel()\n"
        "import torch.utils.cpp_extension as c\n"
        "assert c.CUDA_HOME is not None\n"  # the condition of the warning held
    )
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "No CUDA runtime" not in out.stderr
