"""The paper's tables and figures, one module per experiment; `reproduce(name, budget=, out=)`
runs one and writes its REPORT.md (see runner.py)."""

from reslab.experiments.runner import BUDGETS, EXPERIMENTS, reproduce

__all__ = ["BUDGETS", "EXPERIMENTS", "reproduce"]
