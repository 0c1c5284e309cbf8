"""Regression's networks: every whole-image network of :mod:`medseg.engine.image_networks`
(MLP, LeNet, ResNet, DenseNet; 2D and 3D), registered under ``regression``, whose linear head
gives one output per target."""

from __future__ import annotations

from torch import nn

from medseg.engine.image_networks import register_image_networks
from medseg.engine.models import create_model
from medseg.tasks.regression.config import RegressionConfig

TASK = "regression"
register_image_networks(TASK)


def create_regressor(cfg: RegressionConfig) -> nn.Module:
    """The configured backbone with ``len(data.targets.columns)`` outputs.

    Raises:
        ModelError: unknown ``model.name`` (with the closest registered one) or an input too small for it.
    """
    return create_model(TASK, cfg.model.name, cfg.model, len(cfg.data.channels), len(cfg.data.targets.columns),
                        cfg.preprocess.size)
