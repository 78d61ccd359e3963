"""The training loop: the paper's recipes, resumable bit for bit, on one or many devices."""

from __future__ import annotations

import contextlib
import copy
import filecmp
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from reslab.data.setup import RunData, build_data
from reslab.engine import rundir
from reslab.engine.config import TrainConfig, check_batch_divides
from reslab.engine.evaluator import evaluate
from reslab.engine.progress import Clock, LossWatch, banner, preprocess_record
from reslab.engine.run_length import iters_from_epochs
from reslab.engine.run_log import RunLog
from reslab.engine.schedules import lr_at, make_sgd, set_lr
from reslab.models import create_model
from reslab.models.cpu_paths import use_cpu_training_paths
from reslab.models.registry import get_classifier
from reslab.runtime import distributed as D
from reslab.runtime.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    copy_atomic,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
    write_text_atomic,
)
from reslab.runtime.memory import tune_malloc
from reslab.runtime.precision import autocast, resolve_precision, tune_cuda


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    warmup_ended_at: int | None = None
    best_val_error: float = math.inf
    best_step: int | None = None  # the step of best_val_error: best.pt holds that step's state
    # Running training statistics since the last evaluation (for metrics.jsonl).
    loss_sum: float = 0.0
    wrong: float = 0.0
    seen: float = 0.0
    wall: float = 0.0  # training seconds before this process started (resumed runs)
    # ResNet-110 warm-up: this rank's wrong/seen since the last 20-step check.
    warm_wrong: int = 0
    warm_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def run_info() -> dict[str, Any]:
    """Hardware, versions and git revision, saved with every run."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        rev = ""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:  # the first processor's fields are enough: all cores are alike here
                key, _, value = ln.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    flags = set(fields.get("flags", "").split())
    # The CPU kind decides the bf16 path (Intel AMX tiles or AVX-512 bf16 dot products, e.g. on
    # AMD Zen 4), so every record names it: "AVX512 (amx_bf16, avx512_bf16)".
    bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"})
    isa = str(torch.backends.cpu.get_cpu_capability())
    info = {
        "git": rev or "unknown",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_isa": f"{isa} ({', '.join(bf16)})" if bf16 else f"{isa} (no native bf16)",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    version = _torchvision_version()
    if version:
        info["torchvision"] = version
    return info


def _torchvision_version() -> str | None:
    """torchvision.__version__ (e.g. "0.29.1+cu130") without importing torchvision, whose import
    costs a CIFAR run ~0.9 s for nothing (it pulls torch._dynamo in): its version.py read as
    text, never run. None where torchvision is not installed."""
    import importlib.metadata
    import importlib.util
    import re

    if "torchvision" in sys.modules:
        return str(sys.modules["torchvision"].__version__)
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None


def _resumed_pre(ckpt: dict[str, Any] | None):
    if ckpt is None or not isinstance(ckpt.get("preprocess"), dict):
        return None
    from reslab.data.preprocess import Preprocess

    return Preprocess.from_dict(ckpt["preprocess"])


def build_model(
    cfg: TrainConfig, num_classes: int, *, resumed: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the options that rebuild it. With `cfg.weights`, the file's own options
    (e.g. torchvision's stride_in_3x3=True) apply unless the config sets them, and the
    classifier is re-initialised when the file has another number of classes (fine-tuning).
    `resumed`: a resumed run's stored options; its checkpoint then holds every weight, so the
    initial weights file is neither read nor needed."""
    options = dict(cfg.model_options)
    file_classes = None
    if resumed is not None:
        model = create_model(cfg.model, **{**resumed, "num_classes": num_classes})
        _freeze(model, cfg)
        return model, {**resumed, "num_classes": num_classes}
    if cfg.weights:
        from reslab.models.weights import read_weights

        _, meta = read_weights(cfg.weights)
        file_opts = dict(meta.get("model_options") or {})
        file_classes = file_opts.pop("num_classes", None)
        options = {**file_opts, **options}
    options["num_classes"] = num_classes
    model = create_model(cfg.model, **options)
    if cfg.weights:
        from reslab.models.weights import load_weights

        head = "load" if file_classes == num_classes else "reinit"
        load_weights(model, cfg.weights, head=head)
    _freeze(model, cfg)
    return model, options


def check_num_classes(
    num_classes: int, classes: list[str], data: object, *, resumed: bool = False
) -> None:
    """The head has one output per class of the data. Fewer: a label past the head, an
    IndexError mid-step. More: outputs that never see a sample and have no class name; the
    files the run writes would be refused when read (a file's classes must match its outputs)."""
    # A run started with a wider head before this was refused still resumes.
    if num_classes != len(classes) and not (resumed and num_classes > len(classes)):
        than = "fewer" if num_classes < len(classes) else "more"
        raise rundir.RunDirError(f"num_classes {num_classes} is {than} than the {len(classes)} "
                                 f"classes of {data}; leave it unset (the data's count)")  # fmt: skip


def _freeze(model: nn.Module, cfg: TrainConfig) -> None:
    if cfg.freeze_backbone:
        head = {id(p) for p in get_classifier(model).parameters()}
        for p in model.parameters():
            p.requires_grad = id(p) in head


@dataclass
class _Interval:
    """Sums since the last host sync (on the device), and images since the last evaluation."""

    loss: torch.Tensor  # float64: sum of loss * batch size
    wrong: torch.Tensor
    seen: int = 0
    images: int = 0  # over all ranks, for images/s
    since: float = field(default_factory=time.perf_counter)


@contextlib.contextmanager
def sigint_latch():
    """Yields [seen]: while inside, Ctrl-C (SIGINT) still raises KeyboardInterrupt as Python's
    own handler does, and is also remembered, so the training loop stops at its next step even
    when the exception landed somewhere that swallowed it (a __del__, a callback: such a run had
    trained on past Ctrl-C). Only Python's default handler on the main thread is replaced."""
    seen = [False]
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # fmt: skip
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        seen[0] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def write_line(bar: tqdm, text: str, file: Any = None) -> None:
    """One line above the progress bar, or without a bar as one write call: runs trained side by
    side (reproduce --jobs) share a terminal, and tqdm's write (text, then the newline) let their
    lines interleave mid-line."""
    if not bar.disable:
        bar.write(text, file=file)
        return
    out = file or sys.stdout
    out.write(text + "\n")
    out.flush()


class Trainer:
    def __init__(
        self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
        recipe: str | None = None, label: str | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.progress, self.recipe = cfg, progress, recipe
        # Put before each printed evaluation row and warning: runs trained side by side in one
        # terminal (reproduce --jobs N) would otherwise print rows nobody can tell apart.
        self._prefix = f"{label}: " if label else ""
        self.interrupted = [False]  # train() shares its sigint_latch here
        self.out = Path(cfg.out)
        self.device = D.resolve_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        self.dist = D.init_from_env(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        tune_cuda(self.device)
        if self.device.type == "cpu":
            # A step's activations reused from the heap, not page-faulted in afresh: at 224px a
            # training step x1.12-1.28 (ResNet-18 at 32 / 128 images, ResNet-50 at 32), an image
            # folder run x1.04-1.08; CIFAR's stay under glibc's own threshold, x0.99
            # (runtime/memory.py, benchmarks/ab_malloc_train.py)
            tune_malloc()
        last = self.out / "last.pt"
        cfg.validate()
        if self.dist.world_size > 1:  # torchrun started directly, not via --nproc
            check_batch_divides(cfg.batch_size, self.dist.world_size)
        rundir.check_out_path(self.out)
        rundir.check_out_outside_data(self.out, cfg.data, cfg.dataset)
        if self.dist.is_main:
            rundir.acquire_lock(self.out)  # before anything in the directory is read or written
        resume = resume or self._elastic_restart(last)
        rundir.check_start(self.out, resume=resume)
        ckpt = load_checkpoint(last, map_location=self.device) if resume and last.exists() else None
        if self.dist.is_main:
            rundir.clean_stale_temps(self.out)
        self._saved_step = None if ckpt is None else int(ckpt["step"])
        torch.manual_seed(cfg.seed)
        self.data: RunData = build_data(cfg, self.device, self.dist, resumed=_resumed_pre(ckpt))
        if self.data.train_size < cfg.batch_size:  # no full batch: the loop would never step
            raise rundir.RunDirError(
                f"the training set has {self.data.train_size} images but one batch needs "
                f"{cfg.batch_size} (batch_size); lower --set batch_size=N or add images"
            )
        note = iters_from_epochs(cfg, train_size=self.data.train_size)
        self.data.notes += [note] if note else []
        if ckpt is not None:
            # Compared once the run has filled in what its recipe leaves open (image size from
            # the weights, iterations from epochs, a fitted batch): a torchrun restart starts
            # from the original command line and must resolve to the stored values.
            rundir.check_resume_config(last, ckpt.get("config") or {}, cfg.to_dict())
            rundir.check_resume_classes(last, ckpt.get("classes"), self.data.classes)
        num_classes = cfg.num_classes or len(self.data.classes)
        check_num_classes(num_classes, self.data.classes, cfg.data, resumed=ckpt is not None)
        self.model, self.model_options = build_model(
            cfg, num_classes, resumed=None if ckpt is None else ckpt.get("model_options")
        )
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.sync_bn:
            # Before the optimizer is built, so that it holds the parameters of the layers used.
            self.model = D.convert_sync_batchnorm(self.model, self.device)
        self.optimizer = make_sgd(
            self.model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov, head_lr_mult=cfg.head_lr_mult, decay_bn=cfg.decay_bn,
        )  # fmt: skip
        # fp16's 5 exponent bits underflow small gradients: the loss is scaled up, the update
        # skipped on overflow. bf16 and fp32 need none (enabled=False makes it a pass-through).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        self._call_wall0 = 0.0  # s.wall when this call's fit() began (its time limit's zero)
        self._log: RunLog | None = None  # main process only, opened by fit()
        self._unfolded_said = False  # _eval_model's one line, said
        if ckpt is not None:
            self._restore(ckpt)
            del ckpt
            self._finish_best()
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        # For the banner: how relu(bn(x) [+ r]) is computed and how 3x3 weight gradients sum.
        self._kernel: str | None = None
        self._wgrad: str | None = None
        if self.device.type == "cpu" and not cfg.compile:
            self._kernel, self._wgrad = use_cpu_training_paths(
                self.model, precision=self.precision, fused_bn_act=cfg.fused_bn_act,
                tiled_wgrad=cfg.tiled_wgrad, announce=self._say if self.dist.is_main else None,
            )  # fmt: skip
        if cfg.compile:
            # dynamic=False: one graph specialised per input shape ([B,3,24,24] then
            # [B,3,32,32] under small_size). With torch's default the second shape recompiles
            # with symbolic sizes, whose steps ran x0.84-0.90 of the specialised ones on Intel
            # AMX, about as fast on AMD Zen 4 and x0.95-0.98 on Zen 5 (bench_compile.py
            # --static, results/cpu-kind/).
            self.net = torch.compile(self.net, mode=cfg.compile_mode, dynamic=False)

    def _say(self, line: str) -> None:
        """One line on stderr ahead of the run's banner (e.g. a kernel compile that takes a
        while, so that the wait is not silent)."""
        print(f"reslab: {self._prefix}{line}", file=sys.stderr, flush=True)

    def _elastic_restart(self, last: Path) -> bool:
        """Under `torchrun --max-restarts K`, a restarted worker group resumes from the last
        checkpoint that this same torchrun job wrote (never from an unrelated run in --out)."""
        if D.restart_count() == 0 or not last.exists():
            return False
        ckpt = load_checkpoint(last)
        if ckpt.get("elastic_run_id") != D.elastic_run_id():
            return False
        if self.dist.is_main:
            print(
                f"torchrun restart {D.restart_count()}: resuming {last} at iteration "
                f"{ckpt['step']}", file=sys.stderr, flush=True,
            )  # fmt: skip
        return True

    def _out_of_time(self) -> bool:
        limit, s = self.cfg.time_limit, self.state
        if limit is None:
            return False
        # The limit is this call's: s.wall also counts the seconds of the calls before a resume,
        # and comparing that would let every resume of a stopped run train one iteration.
        over = s.wall - self._call_wall0 >= limit
        if not self.dist.enabled:
            return over
        # Each rank has its own clock: they agree (one collective, at log steps only) so that
        # none starts the final evaluation while the others still train.
        return s.step % self.cfg.log_every == 0 and D.any_rank(over, self.device)

    # --- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": "reslab",
            "version": CHECKPOINT_VERSION,
            "model_name": self.cfg.model,
            "model_options": self.model_options,
            "model": self.model.state_dict(),
            "preprocess": self.data.preprocess.to_dict(),
            "classes": self.data.classes,
            "step": s.step,
            "config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16
            "data_state": self.data.train.state_dict(),
            "train_state": {
                "warmup_ended_at": s.warmup_ended_at,
                "best_val_error": s.best_val_error,
                "best_step": s.best_step,
                "loss_sum": s.loss_sum,
                "wrong": s.wrong,
                "seen": s.seen,
                "wall": s.wall,
                "history": s.history,
                "warm_wrong": int(self._warm_wrong),  # one host sync per checkpoint
                "warm_seen": self._warm_seen,
            },
            "world_size": self.dist.world_size,
            "elastic_run_id": D.elastic_run_id(),
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            # torch checks neither: a momentum buffer of another shape than its parameter
            # aborts the process (not an exception) inside SGD's fused update.
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                    if buf is not None and buf.shape != p.shape:
                        raise ValueError(f"a momentum buffer of shape {list(buf.shape)} for a "
                                         f"parameter of shape {list(p.shape)}")  # fmt: skip
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{self.out / 'last.pt'} does not fit {self.cfg.model} "
                f"({str(e).splitlines()[0][:300]}); resume with the model it was trained with"
            ) from None
        set_rng_state(ckpt["rng"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.data.train.load_state_dict(ckpt["data_state"])
        ts = ckpt["train_state"]
        self.state = TrainState(step=int(ckpt["step"]), **ts)

    def _save(self, name: str) -> None:
        # The loss was checked at this step; the update after it must be finite too, so that
        # `last.pt` always holds a good state.
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()])
        if not bool(finite.all()):
            raise self._diverged(f"weights became NaN/Inf at iteration {self.state.step}")
        if self.dist.is_main:
            save_atomic(self._checkpoint(), self.out / name)  # with its digest
        self._saved_step = self.state.step

    def _save_best(self) -> None:
        """best.pt = the last.pt just written (whose state.best_step already names this step)."""
        if self.dist.is_main:
            copy_atomic(self.out / "last.pt", self.out / "best.pt")

    def _finish_best(self) -> None:
        """A kill between the last.pt and best.pt writes of a new best evaluation leaves best.pt
        behind; last.pt already says that its step is the best, so a resumed run finishes it."""
        s, last, best = self.state, self.out / "last.pt", self.out / "best.pt"
        if s.best_step is None or s.best_step != s.step or not self.dist.is_main:
            return
        if not (best.is_file() and filecmp.cmp(last, best, shallow=False)):
            copy_atomic(last, best)

    def _diverged(self, what: str) -> TrainingDiverged:
        """The NaN message, true to what is on disk and to the precision in use."""
        last = self.out / "last.pt"
        if self._saved_step is not None:
            kept = f"{last} still holds the last good state (iteration {self._saved_step})"
        else:
            kept = "no checkpoint was written yet, so there is nothing to resume"
        fix = "lower the learning rate (--set lr=...)"
        if self.precision != "fp32":
            fix += f", or use --precision fp32 (this run used {self.precision})"
        return TrainingDiverged(f"{what}; {kept}. Fix: {fix}")

    # --- evaluation and logging --------------------------------------------------------------
    def _evaluate_all(self, lr: float, images_per_s: float) -> dict[str, Any]:
        s = self.state
        loss_sum, wrong, seen = s.loss_sum, s.wrong, s.seen  # already summed over ranks
        if self.dist.enabled:
            D.broadcast_buffers(self.model)
        row: dict[str, Any] = {
            "iter": s.step,
            "epoch": round(s.step * self.cfg.batch_size / self.data.train_size, 3),
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_error": 100.0 * wrong / max(seen, 1),
        }
        # The model `reslab eval` runs (BatchNorm folded into the convolutions, channels_last on
        # the CPU; a copy, made once per evaluation), so a checkpoint evaluates to the run's own
        # numbers. ResNet-20's 6-view test of 10k CIFAR-10 images on 2 cores: 11.9 s -> 8.5 s (and
        # ~7 s with evaluator.FORWARD_CHUNK 256).
        net = self._eval_model() if self.data.evals else self.model
        for split, loader in self.data.evals.items():
            shown = tqdm(loader, desc=f"eval {split}", unit="batch", leave=False,
                         disable=not (self.progress and self.dist.is_main))  # fmt: skip
            r = evaluate(net, shown, device=self.device, precision=self.precision,
                         num_classes=self.model_options["num_classes"],
                         views=self.cfg.eval_views)  # fmt: skip
            row[f"{split}_error"], row[f"{split}_top5"] = r.top1_error, r.top5_error
        row["images_per_s"] = images_per_s
        row["wall_time"] = s.wall
        s.loss_sum = s.wrong = s.seen = 0.0
        s.history.append(row)
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self._log is not None:
                self._log.evaluation(row)
        return row

    def _eval_model(self) -> nn.Module:
        """The folded copy for evaluations; the model itself where it cannot be copied (e.g. a
        hook holding a lock, added through the Python API): said once, and the run goes on."""
        from reslab.engine.eval_run import fast_eval_model

        try:
            return fast_eval_model(self.model, self.device, self.precision)
        except Exception as e:  # an evaluation must not end the run
            if not self._unfolded_said and self.dist.is_main:
                self._unfolded_said = True
                self._say(f"evaluating the model unfolded (its copy failed: {type(e).__name__}: "
                          f"{e}); the numbers are the same up to rounding")  # fmt: skip
            return self.model

    def _train_mode(self) -> None:
        """Training mode, except BatchNorm layers whose parameters are frozen (freeze_backbone):
        they keep the loaded running statistics and normalise with them, so a frozen backbone
        computes exactly the features of the file it came from."""
        self.net.train()
        for m in self.model.modules():
            params = list(m.parameters(recurse=False))
            bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
            if bn and params and not any(p.requires_grad for p in params):
                m.eval()

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, s, dev = self.cfg, self.state, self.device
        if self.dist.is_main:
            self._open_run_dir()
        self._train_mode()
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        iv = _Interval(torch.zeros((), device=dev, dtype=torch.float64),
                       torch.zeros((), device=dev, dtype=torch.int64))  # fmt: skip
        self._warm_wrong = torch.full((), s.warm_wrong, device=dev, dtype=torch.int64)
        self._warm_seen = s.warm_seen
        bar = tqdm(
            total=cfg.iters, initial=s.step, disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True, desc=cfg.model, unit="it",
        )  # fmt: skip
        t0, wall0 = time.perf_counter(), s.wall
        self._call_wall0 = wall0  # where this call's time limit starts counting
        # Progress about once a second (one host sync each); on one process only, since under
        # torch.distributed the sync is a collective that every rank must enter at the same step.
        clock, watch = Clock(1.0), LossWatch()
        row: dict[str, Any] = {}
        done = s.step >= cfg.iters
        while not done:
            for x, y in self.data.train:
                if self.interrupted[0]:  # a Ctrl-C whose KeyboardInterrupt was swallowed
                    raise KeyboardInterrupt
                lr = self._step(x, y, criterion, iv)
                at_eval = s.step % cfg.eval_every == 0 or s.step >= cfg.iters
                s.wall = wall0 + time.perf_counter() - t0
                out_of_time = self._out_of_time()
                saving = s.step % cfg.save_every == 0
                timed = not self.dist.enabled and clock.due()
                if s.step % cfg.log_every == 0 or at_eval or out_of_time or saving or timed:
                    ips = self._sync(iv, lr, bar, watch)
                if at_eval or out_of_time:
                    row = self._evaluate_and_save(lr, ips, bar, iv)
                elif saving:
                    self._save("last.pt")
                if s.step >= cfg.iters or out_of_time:
                    done = True
                    break
        bar.close()
        if self._log is not None:
            self._log.close()
        D.barrier()
        final = row or (s.history[-1] if s.history else {})
        if self.dist.is_main:
            write_text_atomic(self.out / "final.json", json.dumps(final, indent=2))
        return final

    def _open_run_dir(self) -> None:
        """config.yaml, metrics.jsonl as of the checkpoint, the run log and the banner."""
        self.out.mkdir(parents=True, exist_ok=True)
        rundir.write_run_config(self.out / "config.yaml", self.cfg.to_dict(), {
            **run_info(), "precision": self.precision, "world_size": self.dist.world_size,
            "device": str(self.device), "preprocess": preprocess_record(self.data.preprocess),
        })  # fmt: skip
        # A resumed run rewrites the log from its checkpoint, dropping rows written after it.
        write_text_atomic(self.out / "metrics.jsonl",
                          "".join(json.dumps(row) + "\n" for row in self.state.history))  # fmt: skip
        self._log = RunLog(self.out, resume_step=self.state.step)
        if self.progress:
            print(self._banner(), file=sys.stderr, flush=True)

    def _step(self, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, iv: _Interval) -> float:
        """One SGD step at the scheduled lr (returned); its loss and errors stay on the device."""
        s = self.state
        lr = self._lr(s.step)
        set_lr(self.optimizer, lr)
        with autocast(self.precision, self.device):
            logits = self.net(x)
            loss = criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # Gradient clipping, if ever added, goes after self.scaler.unscale_(opt) here.
        # The fused SGD takes the scale and the overflow flag as tensors: no host sync.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        s.step += 1
        n = y.numel()
        with torch.no_grad():
            wrong = (logits.argmax(1) != y).sum()
            iv.loss += loss.detach().double() * n
            iv.wrong += wrong
        iv.seen += n
        iv.images += n * self.dist.world_size
        if self.cfg.warmup_lr is not None and s.warmup_ended_at is None:
            self._check_warmup(wrong, n)
        return lr

    def _check_warmup(self, wrong: torch.Tensor, n: int) -> None:
        """ResNet-110's warm-up (section 4.2) ends once the training error is below
        warmup_until_error: one host sync per 20 steps, during warm-up only."""
        self._warm_wrong += wrong
        self._warm_seen += n
        if self.state.step % 20:
            return
        err = (100.0 * float(D.all_reduce_sum(self._warm_wrong.clone()))
               / (self._warm_seen * self.dist.world_size))  # fmt: skip
        self._warm_wrong.zero_()
        self._warm_seen = 0
        if err < self.cfg.warmup_until_error:
            self.state.warmup_ended_at = self.state.step

    def _sync(self, iv: _Interval, lr: float, bar: tqdm, watch: LossWatch) -> float:
        """The host sync of this interval; returns images/s since the last evaluation. Sums over
        all ranks, so every rank holds (and checkpoints) the same global statistics."""
        s = self.state
        acc = torch.stack([iv.loss, iv.wrong.double(), iv.loss.new_tensor(iv.seen)])
        loss_sum, wrong_sum, seen_sum = D.all_reduce_sum(acc).tolist()
        s.loss_sum += loss_sum
        s.wrong += wrong_sum
        s.seen += seen_sum
        iv.loss.zero_()
        iv.wrong.zero_()
        iv.seen = 0
        if not math.isfinite(s.loss_sum):
            raise self._diverged(f"loss became {s.loss_sum} by iteration {s.step} (lr {lr:g})")
        ips = iv.images / max(time.perf_counter() - iv.since, 1e-9)
        if self.dist.is_main and seen_sum:
            self._log_step(watch, bar, loss_sum / seen_sum, 100 * wrong_sum / seen_sum, lr, ips)
        bar.set_postfix(
            loss=f"{s.loss_sum / max(s.seen, 1):.3f}",
            err=f"{100 * s.wrong / max(s.seen, 1):.1f}%", lr=f"{lr:.3g}",
            img_s=f"{ips:.0f}", refresh=False,
        )  # fmt: skip
        bar.update(s.step - bar.n)
        return ips

    def _evaluate_and_save(self, lr: float, ips: float, bar: tqdm, iv: _Interval) -> dict:
        """Evaluate, then last.pt (and best.pt for a new best validation error)."""
        s = self.state
        row = self._evaluate_all(lr, ips)
        self._train_mode()
        iv.images, iv.since = 0, time.perf_counter()
        val = row.get("val_error")
        new_best = val is not None and val < s.best_val_error
        if new_best:  # recorded in last.pt first, so a kill cannot lose best.pt
            s.best_val_error, s.best_step = val, s.step
        self._save("last.pt")
        if new_best:
            self._save_best()
        if self.dist.is_main:
            write_line(bar, self._prefix + self._format_row(row))
        return row

    def _log_step(
        self, watch: LossWatch, bar: tqdm, loss: float, error: float, lr: float, ips: float
    ) -> None:
        """steps.jsonl/TensorBoard row of the interval since the last one; loss-jump warning."""
        s = self.state
        warn = watch.update(loss, step=s.step, lr=lr)
        if warn:
            write_line(bar, self._prefix + warn, file=sys.stderr)
        if self._log is not None:
            self._log.step({
                "iter": s.step, "epoch": round(s.step * self.cfg.batch_size / self.data.train_size, 3),
                "loss": loss, "error": error, "lr": lr, "images_per_s": ips, "wall_time": s.wall,
            })  # fmt: skip

    def _banner(self) -> str:
        cfg = self.cfg
        # Eval loaders are ShardedOrder objects: _n is the split's size over all ranks.
        evals = {k: int(getattr(v, "_n", 0)) for k, v in self.data.evals.items()}
        resumed = f"resuming at iteration {self.state.step}" if self.state.step else "new run"
        return banner(
            cfg, recipe_note=f"recipe {self.recipe or 'defaults (no --recipe)'}, {resumed}",
            train_size=self.data.train_size, classes=len(self.data.classes), evals=evals,
            device=self.device, precision=self.precision, world_size=self.dist.world_size,
            notes=self.data.notes, kernel=self._kernel, wgrad=self._wgrad,
        )  # fmt: skip

    def _lr(self, it: int) -> float:
        c = self.cfg
        return lr_at(
            it, schedule=c.schedule, base=c.lr, milestones=c.milestones, gamma=c.gamma,
            total=c.iters, warmup_iters=c.warmup_iters, warmup_lr=c.warmup_lr,
            warmup_ended_at=self.state.warmup_ended_at,
        )  # fmt: skip

    @staticmethod
    def _format_row(r: dict[str, Any]) -> str:
        parts = [f"iter {r['iter']}", f"train err {r['train_error']:.2f}%"]
        for k in ("val_error", "test_error"):
            if k in r:
                parts.append(f"{k.replace('_', ' ')} {r[k]:.2f}%")
        parts.append(f"{r['images_per_s']:.0f} img/s")
        return " | ".join(parts)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    recipe: str | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Train per `cfg`; returns the final evaluation row (also in RUN_DIR/final.json). `label`
    (a run's name) goes before each printed evaluation row and warning. `cfg` is left as it
    was: what the run works out (image size and resize from the weights, iterations from
    epochs, milestones, normalisation) goes into its own copy, saved as RUN_DIR/config.yaml;
    written back, a config reused for a second run (other weights) had trained with the first
    run's values (a torchvision ResNet-18 fine-tuned at 32 px)."""
    cfg = copy.deepcopy(cfg)
    try:
        with sigint_latch() as seen:
            trainer = Trainer(cfg, resume=resume, progress=progress, recipe=recipe, label=label)
            trainer.interrupted = seen
            final = trainer.fit()
    finally:
        rundir.release_lock(Path(cfg.out))
    D.shutdown()  # leave the process group (torchrun runs) so that the process exits cleanly
    return final
