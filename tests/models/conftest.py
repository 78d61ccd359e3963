"""Fixtures of the model tests."""

from __future__ import annotations

import pytest

from reslab.models import conv_wgrad
from reslab.models.bn_act import load_kernel


@pytest.fixture(scope="module")
def ext():
    """reslab's CPU kernels extension where its AMX kernels run; the test is skipped elsewhere
    (the AMX code is not built for a CPU without AMX tiles)."""
    if not conv_wgrad.available():
        pytest.skip("the AMX kernels do not run on this CPU (built without AMX tiles)")
    return load_kernel()
