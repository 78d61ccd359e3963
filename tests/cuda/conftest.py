"""On-card proofs of issue 14. Every test here carries the `gpu` marker and is skipped without
CUDA; scripts/gpu_check.sh runs them on a lent GPU (`pytest -m gpu tests/cuda`)."""

from __future__ import annotations

import os

# cuBLAS reads this when its handle is made: deterministic GEMMs for the resume test. Set before
# any CUDA work of this process (the torch import alone does none).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
