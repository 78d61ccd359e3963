"""BatchNorm + (residual add) + ReLU as one op on the CPU: relu(bn(x) [+ r]) in training mode.

On a 2-core CPU a CIFAR ResNet's training step spends about half its time in batch norm, ReLU
and the residual adds, each a separate pass over memory (results/cpu-kind/). This op makes the
forward two passes (channel sums, then normalise+add+ReLU) and the backward two (masked sums,
then the input gradient and, with a residual, the shortcut's gradient), with a C++ kernel
(kernels/bn_act.cpp: AVX-512 code where the CPU has it, AVX2 code on CPUs without it, portable
vector code elsewhere) compiled on first use for this CPU and cached by torch, its loops on
torch's own OpenMP threads (`_openmp_library`; one thread where that runtime cannot be found).
The ReLU's mask is kept as one bit per value, so the backward reads x, dy and the bits rather
than x, dy and y. The model is unchanged: the same BatchNorm2d modules, parameters, running
statistics and state_dict; only how `relu(bn(x) + r)` is computed differs. An identity block's
input feeds both its shortcut and its first conv; `fork_for_shortcut` has the kernel sum the
two gradients it gets back.

Used where every condition holds (see `usable`): the block's `fused_bn_act` flag (set by
`use_fused_bn_act`, which the trainer calls for CPU runs), training mode, an nn.BatchNorm2d with
affine weights, running statistics and a momentum, CPU tensors in channels_last, bf16 or fp32,
channels a multiple of 16, and not inside torch.compile. Anything else takes the eager path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import time
import warnings
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reslab.models.layers import _eager_training, set_block_flag

_LOCK = threading.Lock()
# The extension's sources (kernels/): the fused BN+ReLU, and the AMX weight gradient and stride-1
# convolution (models/conv_wgrad.py) that share its build.
_SOURCES = ("bn_act.cpp", "conv_wgrad.cpp", "conv_fwd.cpp", "block.cpp", "augment.cpp", "bind.cpp")
_HEADERS = ("amx.h", "api.h")  # included by the sources: materialised beside them
_EXT: Any = None
_FAILED: str | None = None


def _cpu_key() -> str:
    """The build targets this CPU (-march=native): a cached build must not be loaded on another
    kind of CPU (the machine may change under the same home directory), so the CPU's model name
    and flags are part of the extension's name."""
    text = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        text += "".join(lines)
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cpp_extension() -> Any:
    """torch.utils.cpp_extension, imported without the warning that a CUDA build of torch logs
    at import on a machine without a GPU ("No CUDA runtime is found, using CUDA_HOME=..."): the
    kernel is CPU code, and the line otherwise opened every CPU run's output."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _kernels_dir() -> str:
    """Where this reslab's kernel sources are (site-packages, or a checkout's src/)."""
    return str(resources.files("reslab.models") / "kernels")


def _build_dir(name: str) -> str:
    """Where torch builds and caches the extension `name`: under TORCH_EXTENSIONS_DIR if set (as
    torch's own builds), else torch's default root, in a directory of its own per environment.
    One home directory may serve several: torch and Python versions (the GPU image's torch 2.11
    beside 2.14 here), whose headers a build must match and whose lock files differ (2.14's is
    kept on purpose and would look like a dead build to an older torch's clean-up below); and
    installs of reslab in other places (a checkout and a site-packages copy, or two clones),
    whose build files name other source paths: shared, each would rebuild over the other at
    every switch, and one process could load the library while another rewrites it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    tag = "\n".join([
        f"torch{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}",
        os.path.dirname(os.path.realpath(torch.__file__)),
        os.path.realpath(_kernels_dir()),
    ])  # fmt: skip
    digest = hashlib.sha256(tag.encode()).hexdigest()[:8]
    return os.path.join(root, f"{name}_{digest}")


def _lock_file_blocks() -> bool:
    """Whether torch's extension build waits for as long as its lock file exists (FileBaton,
    torch <= 2.13, e.g. the GPU image's 2.11), so that one left by a killed build hangs every
    later run. torch 2.14 holds an OS advisory lock on a file that stays (released by the kernel
    when its holder dies): that file must be left alone, or two builds could run at once."""
    return not hasattr(_cpp_extension(), "FileLock")


def _clear_stale_lock(lock: str, max_age_s: float = 600.0) -> None:
    """For torch's existence-blocking lock (see `_lock_file_blocks`): a build takes under a
    minute, so a lock file older than max_age_s is a dead build's and is removed."""
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return  # no lock: nobody is building
    if age > max_age_s:
        warnings.warn(f"reslab: removing a stale kernel build lock {lock} ({age:.0f} s old)",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        with contextlib.suppress(OSError):
            os.remove(lock)


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs `ninja` from PATH; the pip package's copy is not on it unless the venv is
    activated (`.venv/bin/reslab ...`), so its folder goes first for the build."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    except (ImportError, AttributeError):
        pass  # a system ninja, if any, is used
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _openmp_library() -> str | None:
    """The GNU OpenMP library (its path) that this process's torch runs its parallel loops on, or
    None where that is not known: the kernel's loops are ATen's header-only `parallel_for`, which
    runs on one thread unless the extension is compiled with -fopenmp, and it must then use the
    very runtime torch loaded (its own copy in pip wheels, beside libtorch_cpu.so) and not a
    second one from the system compiler (two OpenMP runtimes in one process can deadlock)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            maps = {ln.split()[-1] for ln in f if "/" in ln}
    except OSError:
        return None  # not Linux: the loops stay on one thread
    if any("iomp" in os.path.basename(p) for p in maps):
        return None  # Intel's runtime: gcc's -fopenmp would bring in a second one
    gomp = sorted(p for p in maps if os.path.basename(p).startswith("libgomp"))
    return gomp[0] if len(gomp) == 1 else None


def _build(name: str, *, march: str, openmp: str | None = None,
           defines: tuple[str, ...] = ()) -> Any:  # fmt: skip
    """Compile the kernels/ sources (`_SOURCES`) for `march`, or load torch's cached build of them,
    as `name`; with `openmp` (a libgomp path from `_openmp_library`) its loops run on torch's
    threads.
    `defines` ("NAME=VALUE") change a build for benchmarks; a name of its own goes with them."""
    load = _cpp_extension().load
    cflags, ldflags = ["-O3", f"-march={march}", "-fno-math-errno"], []
    cflags += [f"-D{d}" for d in defines]
    if openmp:
        # Compiled with -fopenmp but linked against torch's loaded libgomp, not the compiler's:
        # the extension's libgomp.so.1 then resolves to the copy already in the process.
        cflags.append("-fopenmp")
        ldflags.append(openmp)
    build = _build_dir(name)
    os.makedirs(build, exist_ok=True)
    if _lock_file_blocks():
        _clear_stale_lock(os.path.join(build, "lock"))
    kernels = resources.files("reslab.models") / "kernels"
    with contextlib.ExitStack() as stack:
        paths = [str(stack.enter_context(resources.as_file(kernels / f))) for f in _SOURCES]
        headers = [str(stack.enter_context(resources.as_file(kernels / f))) for f in _HEADERS]
        stack.enter_context(_ninja_on_path())
        return load(
            name=name,
            sources=paths,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=sorted({os.path.dirname(h) for h in headers}),
            build_directory=build,
            verbose=False,
        )


def _kernel_name(openmp: str | None) -> str:
    """The extension's name, and so its build directory, for this CPU with or without OpenMP."""
    return f"reslab_bn_act_{_cpu_key()}" + ("_omp" if openmp else "")


def kernel_needs_build() -> bool:
    """Whether `load_kernel` would compile the extension now: nothing loaded yet and no build of
    it cached for this CPU and environment. The compile takes a while (41 s on a 2-core AMD Zen
    3, 119 s before the sources stopped including <torch/extension.h>: bench_kernel_build.py),
    so a run says so first."""
    if _EXT is not None or _FAILED is not None or os.environ.get("RESLAB_BN_KERNEL") == "0":
        return False
    name = _kernel_name(_openmp_library())
    build = _build_dir(name)
    return not any(os.path.exists(os.path.join(build, name + ext)) for ext in (".so", ".pyd"))


def load_kernel() -> Any | None:
    """The compiled extension, built on the first call (about 40 s on 2 cores) and cached by torch
    (`_build_dir`); None (with one warning) where it cannot be built, and None without a
    warning under RESLAB_BN_KERNEL=0 (the eager path, e.g. to compare)."""
    global _EXT, _FAILED
    if _EXT is not None or _FAILED is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None or _FAILED is not None:
            return _EXT
        if os.environ.get("RESLAB_BN_KERNEL") == "0":
            _FAILED = "off: RESLAB_BN_KERNEL=0"
            return None
        try:
            openmp = _openmp_library()
            try:
                _EXT = _build(_kernel_name(openmp), march="native", openmp=openmp)
            except Exception:
                if not openmp:
                    raise
                # A compiler without OpenMP support: the same kernel on one thread.
                _EXT = _build(_kernel_name(None), march="native")
        except Exception as e:  # no compiler, no ninja, a read-only cache: fall back, once
            _FAILED = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
            warnings.warn(
                "reslab: the fused batch-norm/ReLU kernel could not be built "
                f"({_FAILED}); training uses the eager path (slower on CPUs). "
                "Install a C++ compiler and ninja to enable it.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _EXT


def loaded_kernel() -> Any | None:
    """The extension where an earlier `load_kernel` built or loaded it, else None; never starts
    a build (for ops that use it only when it is there anyway)."""
    return _EXT


def usable(bn: nn.Module, x: torch.Tensor, r: torch.Tensor | None) -> bool:
    """Whether relu(bn(x) [+ r]) can run through the fused kernel (see the module docstring)."""
    if not (bn.training and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats):
        return False
    if bn.momentum is None or torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    # The kernel keeps BN's parameters and statistics in fp32, as autocast does, and updates
    # the statistics and the batch counter in place.
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return False
    if bn.num_batches_tracked is None or bn.num_batches_tracked.dtype != torch.long:
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 4:
        return False
    if x.shape[1] % 16 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if r is not None and (r.dtype != x.dtype or r.shape != x.shape):
        return False
    if x.numel() // x.shape[1] < 2:  # batch norm of one value per channel: eager raises
        return False
    return load_kernel() is not None


class _BNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, weight, bias, bn):  # type: ignore[override]
        ext = load_kernel()
        if r is not None:
            r = r.contiguous(memory_format=torch.channels_last)
        # mask: one bit per value of y (y > 0) for the ReLU's backward, [numel / 16] int16.
        # bn's running statistics and counter are updated by the kernel, as torch.lerp_ would:
        # the running variance takes the unbiased batch variance, as in torch's BatchNorm.
        y, mask, mean, rstd = ext.forward_train(
            x, r, weight, bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
            bn.momentum, bn.eps,
        )  # fmt: skip
        ctx.save_for_backward(x, mask, mean, rstd, weight)
        ctx.with_residual = r is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, mask, mean, rstd, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx, dw, db, dr = load_kernel().backward(dy, x, mask, mean, rstd, weight, ctx.with_residual)
        return dx, (dr if ctx.with_residual else None), dw, db, None


def bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor, r: torch.Tensor | None = None,
            *, fused: bool = False) -> torch.Tensor:  # fmt: skip
    """relu(bn(x) + r) (r optional): the fused kernel when `fused` and `usable`, else eager."""
    if not (fused and usable(bn, x, r)):
        out = bn(x)
        return F.relu(out if r is None else out + r, inplace=True)  # `out` is a new tensor
    # Under autocast the conv output x is bf16 and BN's parameters fp32, as in eager autocast.
    with torch.autocast(x.device.type, enabled=False):
        return _BNAct.apply(x, r, bn.weight, bn.bias, bn)


class _Fork(torch.autograd.Function):
    """x used twice, by an identity shortcut and by the block's first conv, with the two
    gradients it gets back summed by the kernel's add instead of autograd's (torch's bf16 add ran
    at a third of the kernel loop's speed on operands that outgrow L2: ~5% of a ResNet-20 step
    on a 2-core CPU). Same values, same bits: both round the fp32 sum to nearest even (where x
    has a third use, the three gradients are grouped otherwise than autograd would: rounding)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, da, db):  # type: ignore[override]
        if da is None or db is None:
            return db if da is None else da
        ext = loaded_kernel()
        if (
            ext is None
            or torch.is_grad_enabled()  # create_graph=True: the sum must stay in the graph
            or da.dtype != db.dtype
            or da.dtype not in (torch.bfloat16, torch.float32)
            or da.shape != db.shape
            or not da.is_contiguous(memory_format=torch.channels_last)
            or not db.is_contiguous(memory_format=torch.channels_last)
        ):
            return da + db
        return ext.add(da, db)


def fork_for_shortcut(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x for the first conv, x for the identity shortcut): two views of x whose gradients the
    kernel sums (`_Fork`) where it applies (eager training on the CPU, channels_last bf16 or
    fp32, channels a multiple of 16, the kernel built); else (x, x) and autograd sums them."""
    if (
        not _eager_training(x)
        or x.device.type != "cpu"
        or x.dtype not in (torch.bfloat16, torch.float32)
        or x.dim() != 4
        or x.shape[1] % 16
        or not x.is_contiguous(memory_format=torch.channels_last)
        or load_kernel() is None
    ):
        return x, x
    return _Fork.apply(x)


def use_fused_bn_act(model: nn.Module, on: bool = True) -> int:
    """Set every block's `fused_bn_act` flag; returns how many modules take it. The flag only
    chooses how training-mode BN+ReLU is computed: weights, outputs and state_dict stay the
    same (tests/models/test_bn_act.py checks outputs and gradients against the eager path)."""
    return set_block_flag(model, "fused_bn_act", on)


def kernel_status() -> str:
    """One line for run banners and benchmarks: whether the fused kernel is in use."""
    if _FAILED is not None:
        return f"eager (kernel build failed: {_FAILED})"
    if _EXT is None:
        return "not built yet"
    n = _EXT.threads()
    return f"fused kernel, {_EXT.simd()}, {n} thread{'s' if n > 1 else ''}"


__all__ = [
    "bn_relu",
    "fork_for_shortcut",
    "kernel_status",
    "load_kernel",
    "loaded_kernel",
    "usable",
    "use_fused_bn_act",
]
