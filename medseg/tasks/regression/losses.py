"""Regression losses, on normalised targets: L1, L2, Huber and log-cosh (one table)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from medseg.tasks.regression.config import RegressionLoss, RegressionLossConfig


class LogCoshLoss(nn.Module):
    """Mean of ``log(cosh(prediction - target))``, written so that large errors do not overflow."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = prediction.float() - target.float()
        # log(cosh(x)) = x + softplus(-2x) - log 2, exact and finite for any x
        return (error + F.softplus(-2.0 * error) - math.log(2.0)).mean()


class _FloatTargets(nn.Module):
    """A torch loss with its target cast to the prediction's shape and float32 (batches carry
    float32 arrays; autocast may give bfloat16 outputs)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(prediction.float(), target.float().reshape(prediction.shape))


REGRESSION_LOSSES: dict[RegressionLoss, Callable[[RegressionLossConfig], nn.Module]] = {
    RegressionLoss.L1: lambda cfg: nn.L1Loss(),
    RegressionLoss.L2: lambda cfg: nn.MSELoss(),
    RegressionLoss.HUBER: lambda cfg: nn.HuberLoss(delta=cfg.huber_delta),
    RegressionLoss.LOGCOSH: lambda cfg: LogCoshLoss(),
}


def create_regression_loss(cfg: RegressionLossConfig) -> nn.Module:
    """``loss(network outputs (B, T), normalised targets (B, T)) -> scalar``."""
    return _FloatTargets(REGRESSION_LOSSES[RegressionLoss(cfg.name)](cfg))
