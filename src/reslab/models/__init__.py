"""Model zoo: ImageNet ResNets (Table 1), CIFAR ResNets (section 4.2), plain twins, AlexNet."""

from reslab.models.registry import (
    ModelInfo,
    classifier_name,
    create_model,
    get_classifier,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "ModelInfo", "classifier_name", "create_model", "get_classifier", "list_models", "model_info",
    "register_model",
]  # fmt: skip
