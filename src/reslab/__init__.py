"""reslab: deep residual learning for image recognition (He et al., 2015) as a library."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "features", "list_models", "model_info", "register_model"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import reslab` (and the CLI's start: `reslab --version`, `reslab models`
    # from its cache) does not pay the 1.5-2.5 s of importing torch.
    if name == "features":
        from reslab.models.features import features

        return features
    if name in ("create_model", "list_models", "model_info", "register_model"):
        import reslab.models

        return getattr(reslab.models, name)
    raise AttributeError(f"module 'reslab' has no attribute {name!r}")
