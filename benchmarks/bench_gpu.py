"""Table 6 on a GPU: time per training step of ResNet-20..110 at section 4.2's batch, by path.

Each path trains the same net on the same on-device CIFAR-10 batches (section 4.2's pad/crop/flip
done on the device per batch, as reslab's trainer does) with the same fused SGD:

  reference  eager fp32, NCHW: the plain loop a user writes first
  eager      bf16 autocast, channels_last (reslab's default path)
  compile    the same + torch.compile (reslab train --compile)
  cudagraph  the same + torch.compile(mode="reduce-overhead") (--compile-mode reduce-overhead)
  graph      the whole step (forward, backward, SGD) captured by hand in one torch.cuda.CUDAGraph
             and replayed: the ceiling on removing launch overhead (CUDA only; not in the trainer)

Small CIFAR nets are expected to be launch-bound on a big GPU (ResNet-110's forward alone is 109
convolutions, 109 BNs and the ReLUs and additions, each a small kernel at batch 128, and the
backward pass about twice that), so the gap between `eager` and `graph` is the overhead to remove.
Timing: CUDA events around three blocks of --steps/3 steps after --warmup steps, the median
block kept (perf_counter after a sync on a CPU). Prints ms/step, img/s, the ratio to
`reference`, TFLOP/s, the fraction of the device's measured bf16 matmul peak, and the
64k-iteration time that each step time projects. --concurrent K also trains the depths K at a
time in separate processes (as `reslab reproduce --jobs K` does) and reports the wall time
that sharing the GPU projects for the whole table.

    python benchmarks/bench_gpu.py --data DIR [--depths 20,110] [--paths eager,graph]
    python benchmarks/bench_gpu.py --synthetic --device cpu --depths 20 --steps 3  # a CPU check

--synthetic uses random uint8 images of CIFAR's shape: a step's time does not depend on pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import time
from collections.abc import Callable, Iterator

import torch
import torch._dynamo
import torch.nn.functional as F

from common import hardware, matmul_peak
from reslab.analysis.complexity import count_macs
from reslab.data.cifar import load_cifar
from reslab.data.loaders import TensorLoader
from reslab.data.setup import cifar_preprocess
from reslab.engine.schedules import make_sgd
from reslab.models import create_model

PATHS = ("reference", "eager", "compile", "cudagraph", "graph")
ITERS = 64000  # section 4.2
BATCH = 128  # section 4.2


def batches(images: torch.Tensor, labels: torch.Tensor, *, channels_last: bool,
            batch: int = BATCH) -> Iterator:  # fmt: skip
    pre = cifar_preprocess("per_pixel", images.cpu())
    loader = TensorLoader(images, labels, batch_size=batch, preprocess=pre, train=True,
                          channels_last=channels_last)  # fmt: skip
    while True:
        yield from loader


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(step: Callable[[], None], dev: torch.device, steps: int, warmup: int,
           repeats: int = 3, ready: Callable[[], object] | None = None) -> float:  # fmt: skip
    """Seconds per step: the median over `repeats` blocks of `steps // repeats` steps, after
    `warmup` untimed ones (CUDA events on a GPU, the host clock after a sync elsewhere).
    ready: called between warm-up and timing (concurrent workers meet at a barrier there)."""
    for _ in range(warmup):
        step()
    _sync(dev)
    if ready is not None:
        ready()
    n = max(1, steps // repeats)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            times.append((time.perf_counter() - t0) / n)
    return sorted(times)[len(times) // 2]


def make_step(path: str, depth: int, data: tuple[torch.Tensor, torch.Tensor],
              dev: torch.device, batch: int = BATCH) -> Callable[[], None]:  # fmt: skip
    """One training step of ResNet-`depth` along `path`, as a closure over its own state."""
    fp32 = path == "reference"
    model = create_model(f"resnet{depth}").to(dev)
    if not fp32:
        model = model.to(memory_format=torch.channels_last)
    opt = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    it = batches(*data, channels_last=not fp32, batch=batch)
    # cache_enabled=False: autocast's weight-cast cache cannot live across CUDA graph replays.
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=not fp32, cache_enabled=False)
    net = model
    if path == "compile":
        net = torch.compile(model)
    elif path == "cudagraph":
        net = torch.compile(model, mode="reduce-overhead")

    def eager_step() -> None:
        x, y = next(it)
        with torch.autocast(**amp):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if path != "graph":
        return eager_step
    if dev.type != "cuda":
        raise RuntimeError("the graph path needs CUDA")
    # Whole-step capture (PyTorch's CUDA-graphs recipe): warm up on a side stream so that the
    # momentum buffers and cuDNN's choices exist, then capture one step; each replay reads the
    # batch from the static tensors the capture saw.
    static_x, static_y = (t.clone() for t in next(it))
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(static_x), static_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(static_x), static_y)
        loss.backward()
        opt.step()

    def graph_step() -> None:
        x, y = next(it)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return graph_step


def _load(args: argparse.Namespace, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n = args.images
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
    else:
        split = load_cifar(args.data, split="train")
        images, labels = split.images, split.labels
    return images.to(dev), labels.to(dev)


def _concurrent_worker(depth: int, path: str, dev: str, args: argparse.Namespace, q,
                       barrier) -> None:  # fmt: skip
    """Build and warm up one net, wait at the barrier until every worker of the wave is warm (so
    that all timed blocks overlap), time it, report (depth, seconds, error) on `q`."""
    try:
        torch.set_num_threads(1)
        d = torch.device(dev)
        _tune(d)
        step = make_step(path, depth, _load(args, d), d, args.batch)
        sec = _timed(step, d, args.steps, args.warmup,
                     ready=lambda: barrier.wait(args.worker_timeout))  # fmt: skip
        q.put((depth, sec, None))
    except BaseException as e:
        barrier.abort()  # the others must not wait for this one
        q.put((depth, None, f"{type(e).__name__}: {e}"))
        raise


def _tune(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as reslab's trainer sets it: fixed shapes


def _wave_results(procs: dict[int, object], q, timeout: float) -> dict[int, float]:
    """Each worker's (depth -> seconds per step); a clear error, not a hang, when a worker dies
    (killed, out of memory) or reports a failure, or the wave outlasts `timeout` seconds."""
    wave: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(wave) < len(procs):
            try:
                depth, sec, err = q.get(timeout=2.0)
            except queue.Empty:
                dead = {d: p.exitcode for d, p in procs.items()  # type: ignore[attr-defined]
                        if d not in wave and p.exitcode is not None}  # fmt: skip
                if dead:
                    raise RuntimeError(
                        "concurrent worker(s) exited before reporting: "
                        + ", ".join(f"ResNet-{d} (exit code {c})" for d, c in dead.items())
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"concurrent wave still running after --worker-timeout {timeout:g} s"
                    ) from None
                continue
            if err is not None:
                raise RuntimeError(f"concurrent worker ResNet-{depth} failed: {err}")
            wave[depth] = sec
    except BaseException:
        for p in procs.values():
            p.terminate()  # type: ignore[attr-defined]
        raise
    return wave


def concurrent(depths: list[int], path: str, dev: torch.device, k: int,
               args: argparse.Namespace) -> list[dict[int, float]]:  # fmt: skip
    """Seconds per step of each depth while k of them train at once in separate processes,
    one dict per wave of k (the deepest first, as the runner hands them out)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    if path != "eager":
        # k compiles at once: each would start a pool of one thread per core otherwise.
        os.environ.setdefault(
            "TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // k))
        )
    order = sorted(depths, reverse=True)
    waves: list[dict[int, float]] = []
    for i in range(0, len(order), k):
        q, barrier = ctx.Queue(), ctx.Barrier(len(order[i : i + k]))
        procs = {d: ctx.Process(target=_concurrent_worker, args=(d, path, str(dev), args, q, barrier))
                 for d in order[i : i + k]}  # fmt: skip
        for p in procs.values():
            p.start()
        wave = _wave_results(procs, q, args.worker_timeout)
        for p in procs.values():
            p.join()
        waves.append(wave)
    return waves


def _record(out: str | None, row: dict) -> None:
    """Append one result as a JSON line, flushed at once: a run killed later keeps it."""
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="directory holding cifar-10-batches-py")
    p.add_argument("--synthetic", action="store_true", help="random images of CIFAR's shape")
    p.add_argument("--device", default="cuda")
    p.add_argument("--depths", default="20,32,44,56,110")
    p.add_argument("--paths", default=",".join(PATHS), help=f"some of {','.join(PATHS)}")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=0, help="also time K depths at once")
    p.add_argument("--concurrent-path", default="eager", choices=PATHS[1:4])
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=600.0,
        help="seconds a concurrent wave may take before it is stopped with an error",
    )
    p.add_argument("--batch", type=int, default=BATCH, help="section 4.2's 128; less for tests")
    p.add_argument("--images", type=int, default=50000, help="synthetic images (CIFAR's 50k)")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time the matmul peak so long")
    p.add_argument("--out", help="also append each result as a JSON line to this file")
    args = p.parse_args()
    if not args.synthetic and not args.data:
        p.error("give --data DIR (holding cifar-10-batches-py) or --synthetic")
    dev = torch.device(args.device)
    depths = [int(d) for d in args.depths.split(",")]
    paths = [s for s in args.paths.split(",") if s]
    if bad := [s for s in paths if s not in PATHS]:
        p.error(f"unknown path(s) {bad}; choose from {PATHS}")
    print(hardware())
    _tune(dev)
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}; cudnn.benchmark on")
    peak = matmul_peak(torch.bfloat16, device=dev, n=8192 if dev.type == "cuda" else 2048,
                       seconds=args.peak_seconds)  # fmt: skip
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    _record(
        args.out,
        {
            "peak_bf16_tflops": peak / 1e12,
            "device": str(dev),
            "hardware": hardware(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        },
    )
    data = _load(args, dev)
    batch = args.batch
    print(f"batch {batch}, {args.steps} timed steps after {args.warmup}; "
          f"projected: {ITERS:,} iterations at that step time\n")  # fmt: skip
    print(f"{'net':<11}{'path':<11}{'ms/step':>9}{'img/s':>9}{'vs ref':>8}{'TFLOP/s':>9}"
          f"{'of peak':>9}{'64k its':>9}")  # fmt: skip
    best: dict[int, float] = {}
    for depth in depths:
        flops = 3 * 2 * count_macs(create_model(f"resnet{depth}"), 32) * batch  # fwd + 2x bwd
        ref = None
        for path in paths:
            t_build = time.perf_counter()
            if path in ("compile", "cudagraph"):
                # Dynamo compiles at most recompile_limit (8) variants of ResNet.forward per
                # process: without a reset the 9th net (3 depths x 2 modes x ...) runs eager.
                torch._dynamo.reset()
            try:
                step = make_step(path, depth, data, dev, batch)
                sec = _timed(step, dev, args.steps, args.warmup)
            except Exception as e:  # one failing path must not hide the others
                print(f"ResNet-{depth:<4}{path:<11}failed: {type(e).__name__}: {e}"[:200])
                _record(args.out, {"net": f"resnet{depth}", "path": path,
                                   "error": f"{type(e).__name__}: {e}"[:300]})  # fmt: skip
                continue
            ref = sec if path == "reference" else ref
            best[depth] = min(best.get(depth, sec), sec)
            ratio = f"{ref / sec:.2f}x" if ref else "-"
            print(f"ResNet-{depth:<4}{path:<11}{sec * 1e3:>9.2f}{batch / sec:>9.0f}{ratio:>8}"
                  f"{flops / sec / 1e12:>9.2f}{100 * flops / sec / peak:>8.1f}%"
                  f"{ITERS * sec / 60:>7.1f}min  (built+timed in "
                  f"{time.perf_counter() - t_build:.0f} s)")  # fmt: skip
            _record(args.out, {
                "net": f"resnet{depth}", "path": path, "ms_per_step": sec * 1e3,
                "img_per_s": batch / sec, "tflops": flops / sec / 1e12,
                "fraction_of_bf16_peak": flops / sec / peak, "minutes_64k": ITERS * sec / 60,
                "built_and_timed_s": time.perf_counter() - t_build,
            })  # fmt: skip
    if best:
        total = sum(ITERS * s for s in best.values())
        print(f"\none after another, each at its fastest path: {total / 60:.1f} min for "
              f"{', '.join(f'ResNet-{d}' for d in best)}")  # fmt: skip
    if args.concurrent > 1:
        waves = concurrent(depths, args.concurrent_path, dev, args.concurrent, args)
        print(f"\n{args.concurrent} at a time ({args.concurrent_path} path, one process each):")
        for wave in waves:
            for d, sec in wave.items():
                print(f"ResNet-{d:<4} {sec * 1e3:8.2f} ms/step while sharing the device "
                      f"({batch / sec:.0f} img/s)")  # fmt: skip
                _record(args.out, {"net": f"resnet{d}", "path": args.concurrent_path,
                                   "concurrent": args.concurrent, "ms_per_step": sec * 1e3,
                                   "img_per_s": batch / sec})  # fmt: skip
        # Each net's 64k iterations at its shared-device step time: the longest of a wave bounds
        # that wave's wall time from above (the nets left speed up as the others finish).
        bound = sum(max(ITERS * s for s in w.values()) for w in waves)
        print(f"table at most {bound / 60:.1f} min wall ({args.concurrent} at a time, "
              f"{sum(map(len, waves))} nets)")  # fmt: skip


if __name__ == "__main__":
    main()
