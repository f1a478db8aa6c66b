"""Models built by name: `create_model('resnet34', num_classes=5)`."""

from defungi.models import concat, convmixer, efficientnet, resnet  # noqa: F401  (registers the families)
from defungi.models.registry import create_model, list_models, model_entry

__all__ = ["create_model", "list_models", "model_entry"]
