"""reslab: deep residual learning for image recognition (He et al., 2015) as a library."""

from reslab.models import create_model, list_models, model_info, register_model
from reslab.models.features import features

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "features", "list_models", "model_info", "register_model"]
