"""McNemar's exact test: hand-computed values and the properties any such test must have."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reslab.analysis.significance import mcnemar


def _vectors(only_a: int, only_b: int, both: int, neither: int) -> tuple[torch.Tensor, ...]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return torch.tensor(a), torch.tensor(b)


def test_hand_computed_values() -> None:
    # 1 vs 9 discordant: P(X <= 1 | n=10, 1/2) = 11/1024, two-sided 22/1024
    t = mcnemar(*_vectors(1, 9, 50, 5))
    assert (t.only_a, t.only_b) == (1, 9) and t.p == pytest.approx(22 / 1024)
    # 0 vs 5: 2/32; no discordant images, or an even split: no evidence at all
    assert mcnemar(*_vectors(0, 5, 3, 3)).p == pytest.approx(2 / 32)
    assert mcnemar(*_vectors(0, 0, 7, 3)).p == 1.0
    assert mcnemar(*_vectors(4, 4, 0, 0)).p == 1.0


@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 50))
def test_symmetric_bounded_and_blind_to_agreement(only_a: int, only_b: int, both: int) -> None:
    t = mcnemar(*_vectors(only_a, only_b, both, 0))
    assert 0 < t.p <= 1
    assert mcnemar(*reversed(_vectors(only_a, only_b, both, 0))).p == t.p
    assert mcnemar(*_vectors(only_a, only_b, 0, both)).p == t.p  # agreed images do not count
    if only_a < only_b:  # one more image for the leader can only strengthen the evidence
        assert mcnemar(*_vectors(only_a, only_b + 1, both, 0)).p <= t.p


def test_mismatched_vectors_are_refused() -> None:
    with pytest.raises(ValueError, match=r"same images, got \(3,\) and \(4,\)"):
        mcnemar(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
