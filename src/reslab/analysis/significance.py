"""Is one net's lower test error more than the test set's sampling noise? McNemar's exact test.

Two nets scored on the same images disagree on some of them; only those discordant images carry
information about which net is better. Under "equally good", each discordant image is a fair
coin between the two, so the count that favours one net is Binomial(n, 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Paired:
    only_a: int  # images only net A classifies correctly
    only_b: int  # images only net B classifies correctly
    p: float  # exact two-sided p-value of "A and B are equally accurate on such images"


def mcnemar(a_right: torch.Tensor, b_right: torch.Tensor) -> Paired:
    """McNemar's exact test from two boolean [N] vectors of per-image correctness."""
    if a_right.shape != b_right.shape or a_right.dim() != 1:
        raise ValueError(
            f"need two [N] vectors over the same images, got {tuple(a_right.shape)} and "
            f"{tuple(b_right.shape)}"
        )
    a, b = a_right.bool(), b_right.bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    # Two-sided: twice the lower tail, in exact integer arithmetic (n is at most the test set).
    tail = sum(math.comb(n, i) for i in range(k + 1))
    p = 1.0 if n == 0 else min(1.0, 2 * tail / 2**n)
    return Paired(only_a, only_b, p)
