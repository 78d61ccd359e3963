"""Train K seeds of one CIFAR recipe as one fused net (models/fused.py), each a run of its own.

Every member keeps its own identity: its seed (initial weights), its own TensorLoader (data
order and augmentation), its own SGD (learning rate, momentum, weight decay: the ResNet-110
warm-up switch is per member), its own metrics.jsonl, final.json and last.pt/best.pt in its own
run directory. Those checkpoints are written by the single-net Trainer's own code, so they are
ordinary reslab checkpoints: `reslab eval` loads them, and `reslab train --resume` continues
any member alone.

The K last.pt files are written with a two-phase commit (all last.next.pt first, then the
renames), so a kill at any moment leaves either every member at the new step or a state that
resuming repairs (see recover_commit): resume after SIGKILL stays exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from reslab.data.loaders import TensorLoader
from reslab.data.setup import build_data
from reslab.engine import rundir
from reslab.engine.config import TrainConfig
from reslab.engine.run_length import iters_from_epochs
from reslab.engine.schedules import make_sgd, set_lr
from reslab.engine.trainer import (
    Trainer,
    TrainingDiverged,
    TrainState,
    build_model,
    check_num_classes,
    run_info,
    sigint_latch,
    write_line,
)
from reslab.models.cifar import CifarResNet
from reslab.models.fused import FusedCifarNet, stack_inputs
from reslab.runtime import distributed as D
from reslab.runtime.checkpoint import load_checkpoint, write_text_atomic
from reslab.runtime.precision import autocast, resolve_precision

# Fields in which the members of one fused run may differ; everything else must be equal.
MEMBER_FIELDS = ("seed", "out")
_NEXT = "last.next.pt"


def member_losses(logits: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0):
    """Each member's mean cross-entropy [K] from fused logits [K, N, C] and labels [K, N].

    Their sum is the loss to backpropagate: member k's parameters only see its own term, so each
    gets exactly the gradient of its own mean loss, as in its separate run."""
    k, n, c = logits.shape
    per = F.cross_entropy(logits.reshape(k * n, c), y.reshape(k * n), reduction="none",
                          label_smoothing=label_smoothing)  # fmt: skip
    return per.view(k, n).mean(1)


def check_members(cfgs: Sequence[TrainConfig]) -> None:
    """Members must share everything but seed and out (and have distinct run directories)."""
    if not cfgs:
        raise ValueError("a fused run needs at least one member config")
    ref = {k: v for k, v in cfgs[0].to_dict().items() if k not in MEMBER_FIELDS}
    for c in cfgs[1:]:
        d = {k: v for k, v in c.to_dict().items() if k not in MEMBER_FIELDS}
        diff = sorted(k for k in ref if ref[k] != d[k])
        if diff:
            raise ValueError(f"fused members must differ only in seed and out; {c.out} differs "
                             f"in {', '.join(diff)}")  # fmt: skip
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ValueError("fused members need distinct run directories (out)")
    if cfgs[0].dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"fused training is for the CIFAR nets, not dataset {cfgs[0].dataset!r}")


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself durable, as save_atomic makes its own
    finally:
        os.close(fd)


def recover_commit(outs: Sequence[Path]) -> None:
    """Finish or undo an interrupted two-phase save of the members' last.pt.

    Phase 1 writes every member's last.next.pt, phase 2 renames them over last.pt. If every
    member has a checkpoint (next or last) at the newest step, phase 1 had finished: complete
    the renames. Otherwise phase 2 never began: every last.pt is still the old, consistent
    state, so the stray next files are dropped."""
    nexts = [Path(o) / _NEXT for o in outs]
    if not any(p.is_file() for p in nexts):
        return
    steps = []
    for o, nxt in zip(outs, nexts, strict=True):
        f = nxt if nxt.is_file() else Path(o) / "last.pt"
        steps.append(int(load_checkpoint(f)["step"]) if f.is_file() else -1)
    target = max(s for s, n in zip(steps, nexts, strict=True) if n.is_file())
    complete = all(s == target for s in steps)
    for o, nxt in zip(outs, nexts, strict=True):
        if nxt.is_file() and complete:
            _replace(nxt, Path(o) / "last.pt")
        elif nxt.is_file():
            nxt.unlink()


def _forever(loader: TensorLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


class FusedTrainer:
    """K single-net Trainers' state (one per member, built without their __init__) around one
    FusedCifarNet; checkpoints, evaluation and metrics rows go through the Trainer's methods."""

    def __init__(
        self, cfgs: Sequence[TrainConfig], *, resume: bool = False, progress: bool = True,
        label: str | None = None,
    ) -> None:  # fmt: skip
        check_members(cfgs)
        self._prefix = f"{label}: " if label else ""  # as Trainer's
        self.interrupted = [False]  # train_fused() shares its sigint_latch here
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("fused training runs in one process; do not start it with torchrun")
        cfg0, self.progress = cfgs[0], progress
        self.device = D.resolve_device(cfg0.device)
        self.dist = D.DistInfo()
        self.precision = resolve_precision(cfg0.precision, self.device)
        if self.precision == "fp16":
            # NOTE: one GradScaler would skip every member's step when one member overflows.
            raise ValueError("fused training runs in fp32 or bf16; use --fused off for fp16")
        outs = [Path(c.out) for c in cfgs]
        for c, o in zip(cfgs, outs, strict=True):
            c.validate()
            rundir.check_out_path(o)
            rundir.acquire_lock(o)  # each member's run directory has one writer, as a single run's
        held = [o for o in outs if (o / "last.pt").exists() or (o / _NEXT).exists()]
        if held and not resume:
            raise FileExistsError(f"{held[0]} already holds a run; pass --resume to continue it, "
                                  "or choose another --out")  # fmt: skip
        if resume:
            recover_commit(outs)
        for o in outs:
            rundir.check_start(o, resume=resume)
            rundir.clean_stale_temps(o)
        data = build_data(cfg0, self.device, self.dist)  # one copy of the images for all
        if not isinstance(data.train, TensorLoader):
            raise ValueError("fused training needs the on-device CIFAR loader")
        num_classes = cfg0.num_classes or len(data.classes)
        check_num_classes(num_classes, data.classes, cfg0.data)
        self.members: list[Trainer] = []
        for cfg in cfgs:
            iters_from_epochs(cfg, train_size=data.train_size)  # as Trainer.__init__ does
            torch.manual_seed(cfg.seed)  # as Trainer.__init__ does before building its model
            model, options = build_model(cfg, num_classes)
            if not isinstance(model, CifarResNet):
                raise ValueError(f"fused training is for the CIFAR nets, not {cfg.model!r}")
            loader = copy.copy(data.train)  # shares the image tensor; own seed and position
            loader.seed, loader.epoch, loader.step = cfg.seed, 0, 0
            m = Trainer.__new__(Trainer)
            m.cfg, m.progress, m.out = cfg, False, Path(cfg.out)
            m.device, m.dist, m.precision = self.device, self.dist, self.precision
            m.data = dataclasses.replace(data, train=loader)
            m.model, m.model_options, m.net = model, options, model
            m.state = TrainState()
            # The single trainer's attributes its save/restore/evaluate methods read.
            m.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # fp32/bf16 only
            m._log, m.recipe, m._saved_step = None, None, None
            m._prefix, m._unfolded_said = f"{cfg.out}: ", False  # Trainer._say, _eval_model
            self.members.append(m)
        self.model = FusedCifarNet([m.model for m in self.members]).to(self.device)
        if cfg0.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        for m in self.members:
            m.optimizer = make_sgd(
                m.model, lr=m.cfg.lr, momentum=m.cfg.momentum, weight_decay=m.cfg.weight_decay,
                nesterov=m.cfg.nesterov, head_lr_mult=m.cfg.head_lr_mult,
                decay_bn=m.cfg.decay_bn,
            )  # fmt: skip
        if resume:
            have = [(m.out / "last.pt").is_file() for m in self.members]
            if any(have) and not all(have):
                missing = [str(m.out) for m, h in zip(self.members, have, strict=True) if not h]
                raise FileExistsError(f"only some members have a last.pt (not {missing[0]}); "
                                      "resume them one by one with `reslab train --resume`")  # fmt: skip
            if all(have):
                for m in self.members:
                    ckpt = load_checkpoint(m.out / "last.pt", map_location=self.device)
                    rundir.check_resume_config(m.out / "last.pt", ckpt.get("config") or {},
                                               m.cfg.to_dict())  # fmt: skip
                    m._restore(ckpt)
                    m._saved_step = m.state.step
                    m._finish_best()
                steps = {m.state.step for m in self.members}
                if len(steps) > 1:
                    raise FileExistsError(f"members' last.pt are at different iterations "
                                          f"{sorted(steps)}; resume them one by one")  # fmt: skip
        self.net: nn.Module = self.model
        if cfg0.compile:  # one graph per input shape, as the single trainer (trainer.py)
            self.net = torch.compile(self.net, mode=cfg0.compile_mode, dynamic=False)

    # --- checkpoints ----------------------------------------------------------------------------
    def _save_last(self) -> None:
        for m in self.members:  # phase 1: the finite-weights check and the write, per member
            m._save(_NEXT)
        for m in self.members:  # phase 2
            _replace(m.out / _NEXT, m.out / "last.pt")

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        ms, cfg, dev = self.members, self.members[0].cfg, self.device
        k = len(ms)
        for m in ms:
            m.out.mkdir(parents=True, exist_ok=True)
            rundir.write_run_config(m.out / "config.yaml", m.cfg.to_dict(), {
                **run_info(), "precision": self.precision, "world_size": 1, "device": str(dev),
                "fused": {"members": k, "seeds": [x.cfg.seed for x in ms]},
            })  # fmt: skip
            write_text_atomic(m.out / "metrics.jsonl",  # rewritten from the checkpoint
                              "".join(json.dumps(row) + "\n" for row in m.state.history))  # fmt: skip
        self.net.train()
        loss_acc = torch.zeros(k, device=dev, dtype=torch.float64)
        wrong_acc = torch.zeros(k, device=dev, dtype=torch.int64)
        seen_acc = 0
        warm = torch.tensor([m.state.warm_wrong for m in ms], device=dev, dtype=torch.int64)
        for i, m in enumerate(ms):
            m._warm_wrong, m._warm_seen = warm[i], m.state.warm_seen  # a view: _checkpoint reads it
        step0 = ms[0].state.step
        bar = tqdm(total=cfg.iters, initial=step0, disable=not self.progress,
                   dynamic_ncols=True, desc=f"{cfg.model} x{k}", unit="it")  # fmt: skip
        streams = [_forever(m.data.train) for m in ms]
        t0 = t_int = time.perf_counter()
        n_int, wall0, ips = 0, ms[0].state.wall, 0.0
        lrs = [m.cfg.lr for m in ms]
        rows: list[dict[str, Any]] = [{} for _ in ms]
        step = step0
        while step < cfg.iters:
            if self.interrupted[0]:  # a Ctrl-C whose KeyboardInterrupt was swallowed
                raise KeyboardInterrupt
            batches = [next(s) for s in streams]
            for i, m in enumerate(ms):
                lrs[i] = m._lr(step)
                set_lr(m.optimizer, lrs[i])
            x = stack_inputs([b[0] for b in batches])
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.stack([b[1] for b in batches])  # [K, N]
            with autocast(self.precision, dev):
                logits = self.net(x)  # [K, N, classes]
                losses = member_losses(logits, y, label_smoothing=cfg.label_smoothing)
            for m in ms:
                m.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            for m in ms:
                m.optimizer.step()
            step += 1
            n = y.shape[1]
            with torch.no_grad():
                wrong = (logits.argmax(2) != y).sum(1)  # [K]
                loss_acc += losses.detach().double() * n
                wrong_acc += wrong
            seen_acc += n
            n_int += n
            for i, m in enumerate(ms):
                m.state.step = step
                if m.cfg.warmup_lr is not None and m.state.warmup_ended_at is None:
                    m._warm_wrong += wrong[i]
                    m._warm_seen += n
                    if step % 20 == 0:  # the single trainer's 20-step check, per member
                        err = 100.0 * float(m._warm_wrong) / m._warm_seen
                        m._warm_wrong.zero_()
                        m._warm_seen = 0
                        if err < m.cfg.warmup_until_error:
                            m.state.warmup_ended_at = step
            wall = wall0 + time.perf_counter() - t0
            for m in ms:
                m.state.wall = wall
            at_eval = step % cfg.eval_every == 0 or step >= cfg.iters
            # This call's seconds: wall0 holds the calls' before a resume (see Trainer).
            out_of_time = cfg.time_limit is not None and wall - wall0 >= cfg.time_limit
            saving = step % cfg.save_every == 0
            if step % cfg.log_every == 0 or at_eval or out_of_time or saving:
                sums = torch.stack([loss_acc, wrong_acc.double()]).tolist()  # one host sync
                for i, m in enumerate(ms):
                    m.state.loss_sum += sums[0][i]
                    m.state.wrong += sums[1][i]
                    m.state.seen += seen_acc
                    if not math.isfinite(m.state.loss_sum):
                        raise TrainingDiverged(
                            f"loss of {m.out} became {m.state.loss_sum} by iteration {step}; "
                            f"every member's last.pt still holds the last good state. Lower "
                            "--set lr=..., or use --precision fp32."
                        )
                loss_acc.zero_()
                wrong_acc.zero_()
                seen_acc = 0
                ips = n_int / max(time.perf_counter() - t_int, 1e-9)  # per member
                mean = sum(m.state.loss_sum / max(m.state.seen, 1) for m in ms) / k
                bar.set_postfix(loss=f"{mean:.3f}", img_s_member=f"{ips:.0f}", refresh=False)
                bar.update(step - bar.n)
            if at_eval or out_of_time:
                rows = [m._evaluate_all(lrs[i], ips) for i, m in enumerate(ms)]
                self.net.train()
                t_int, n_int = time.perf_counter(), 0
                new_best = []
                for m, row in zip(ms, rows, strict=True):
                    val = row.get("val_error")
                    # Recorded before last.pt is written, so a kill before the best.pt copy is
                    # finished by the resumed run (Trainer._finish_best).
                    if val is not None and val < m.state.best_val_error:
                        m.state.best_val_error, m.state.best_step = val, step
                        new_best.append(m)
                self._save_last()
                for m in new_best:
                    m._save_best()
                write_line(bar, self._prefix + " || ".join(Trainer._format_row(r) for r in rows))
            elif saving:
                self._save_last()
            if out_of_time:
                break
        bar.close()
        finals = []
        for m, row in zip(ms, rows, strict=True):
            final = row or (m.state.history[-1] if m.state.history else {})
            write_text_atomic(m.out / "final.json", json.dumps(final, indent=2))  # the runner
            # reads final.json to skip a finished run
            finals.append(final)
        return finals


def train_fused(
    cfgs: Sequence[TrainConfig],
    *,
    resume: bool = False,
    progress: bool = True,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Train the members together; returns each member's final evaluation row. `label` goes
    before each printed evaluation row."""
    try:
        with sigint_latch() as seen:  # as train(): a swallowed Ctrl-C still stops the run
            trainer = FusedTrainer(cfgs, resume=resume, progress=progress, label=label)
            trainer.interrupted = seen
            return trainer.fit()
    finally:
        for c in cfgs:
            rundir.release_lock(Path(c.out))
