"""Model registry: networks chosen by name from config (timm's ``create_model`` pattern)."""

from medseg.models.registry import MODEL_REGISTRY, ModelError, create_model

__all__ = ["MODEL_REGISTRY", "ModelError", "create_model"]
