"""Model zoo: ImageNet ResNets (Table 1), CIFAR ResNets (section 4.2), plain twins, AlexNet."""

from reslab.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
