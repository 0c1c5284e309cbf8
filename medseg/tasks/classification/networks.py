"""Classification's networks: every whole-image network of :mod:`medseg.engine.image_networks`
(MLP, LeNet, ResNet, DenseNet; 2D and 3D), registered under ``classification`` with one output
per class (logits of shape ``(B, num_outputs)``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medseg.engine.image_networks import head_prefix, register_image_networks
from medseg.engine.models import create_model
from medseg.tasks.classification.config import ClassificationModelConfig

TASK = "classification"
register_image_networks(TASK)

__all__ = ["TASK", "create_classifier", "head_prefix"]


def create_classifier(cfg: ClassificationModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    """Build the classification network named by ``cfg.name``.

    Raises:
        ModelError: unknown name (with the closest registered one) or an input too small for it.
    """
    return create_model(TASK, cfg.name, cfg, in_channels, outputs, size)
