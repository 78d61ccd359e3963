"""A seeded, stratified held-out validation split for image folders that have no val/ folder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence[int], *, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): `fraction` of each class held out, at least one image
    of every class with two or more (so each class is validated), never a class's last image.

    The draw depends on the seed and the labels only, so a resumed run gets the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1]))
    y = np.asarray(labels, dtype=np.int64)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = (
            0
            if fraction == 0 or len(idx) < 2
            else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        )
        val.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return sorted(train), sorted(val)
