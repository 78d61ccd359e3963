"""Keeping a step schedule's shape when a run is made shorter or longer than its recipe."""

from __future__ import annotations

from reslab.engine.config import TrainConfig


def scale_milestones(cfg: TrainConfig, new_iters: int) -> str | None:
    """Set cfg.iters to `new_iters`; a step schedule's milestones move proportionally.

    NOTE(paper): the paper's milestones (32k/48k of 64k, section 4.2) belong to its 64k
    iterations; kept as they are, a 2,000-iteration run would never lower its lr. Scaling keeps
    the schedule's shape (lr /10 at 1/2 and 3/4 of the run), which is what a shortened
    reproduction needs. Returns a note for the user when milestones moved.
    """
    old_iters, old = cfg.iters, list(cfg.milestones)
    cfg.iters = new_iters
    if cfg.schedule != "step" or new_iters == old_iters or not old or old_iters <= 0:
        return None
    scaled: list[int] = []
    for m in sorted(old):
        # Distinct milestones stay distinct: rounded alone, 32k/48k of 64k at 3 iterations
        # both became 2 (lr /100 in one step); each now comes at least one step after the last.
        scaled.append(max(1, round(m * new_iters / old_iters), scaled[-1] + 1 if scaled else 1))
    cfg.milestones = scaled
    short = [m for m in scaled if m >= new_iters]
    return (
        f"lr milestones scaled with the run length: {old} of {old_iters} iterations -> "
        f"{cfg.milestones} of {new_iters}"
        + (f" ({len(short)} at or after the end: too short a run to reach them)" if short else "")
    )


def shorten_warmup(cfg: TrainConfig) -> str | None:
    """A linear warm-up capped at a tenth of a run shortened with --iters, as `reslab demo` plans
    its runs: cifar10-fast's 200 iterations would take all of a 20-iteration run, which then never
    reached its lr nor decayed. Returns a note when it changed."""
    cap = cfg.iters // 10
    if cfg.warmup_iters <= cap:
        return None
    old, cfg.warmup_iters = cfg.warmup_iters, cap
    return (f"linear lr warm-up shortened with the run: {old} -> {cap} iterations (a tenth of "
            f"{cfg.iters}); --set warmup_iters=N sets it")  # fmt: skip


def long_warmup_note(cfg: TrainConfig) -> str | None:
    """A warning when the linear warm-up takes more than half of the run (the lr would peak late
    or never, and a cosine schedule hardly decays): said, not changed, since it is the config's."""
    if cfg.warmup_iters * 2 <= cfg.iters:
        return None
    return (f"the linear lr warm-up ({cfg.warmup_iters:,} iterations) takes more than half of "
            f"this {cfg.iters:,}-iteration run; --set warmup_iters=N shortens it")  # fmt: skip


def iters_from_epochs(cfg: TrainConfig, *, train_size: int) -> str | None:
    """The one place a run's length in epochs becomes cfg.iters (milestones scaled as above);
    nothing to do when the config gives iterations."""
    if cfg.epochs is None:
        return None
    note = scale_milestones(cfg, max(1, round(cfg.epochs * train_size / cfg.batch_size)))
    warn = long_warmup_note(cfg)
    return "; ".join(n for n in (note, warn) if n) or None
