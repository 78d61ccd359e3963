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
    cfg.milestones = [max(1, round(m * new_iters / old_iters)) for m in old]
    return (
        f"lr milestones scaled with the run length: {old} of {old_iters} iterations -> "
        f"{cfg.milestones} of {new_iters}"
    )


def iters_from_epochs(cfg: TrainConfig, *, train_size: int) -> str | None:
    """The one place a run's length in epochs becomes cfg.iters (milestones scaled as above);
    nothing to do when the config gives iterations."""
    if cfg.epochs is None:
        return None
    return scale_milestones(cfg, max(1, round(cfg.epochs * train_size / cfg.batch_size)))
