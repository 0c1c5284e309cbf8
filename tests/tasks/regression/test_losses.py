"""The seed losses: each is what its name says on (B, targets) outputs, and log-cosh stays finite."""

from __future__ import annotations

import pytest
import torch

from medseg.tasks.regression.config import RegressionLoss, RegressionLossConfig
from medseg.tasks.regression.losses import create_regression_loss


@pytest.mark.parametrize(("name", "expected"), [
    ("l1", lambda e: e.abs().mean()),
    ("l2", lambda e: e.square().mean()),
    ("huber", lambda e: torch.where(e.abs() < 0.5, 0.5 * e.square(), 0.5 * (e.abs() - 0.25)).mean()),
    ("logcosh", lambda e: torch.log(torch.cosh(e)).mean()),
])
def test_each_loss_matches_its_formula(name: str, expected) -> None:  # noqa: ANN001 - the formula
    torch.manual_seed(0)
    prediction, target = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss = create_regression_loss(RegressionLossConfig(name=RegressionLoss(name), huber_delta=0.5))
    value = loss(prediction, target.float())
    assert torch.isclose(value.double(), expected((prediction.float() - target.float()).double()), rtol=1e-5)


def test_log_cosh_is_finite_for_huge_errors_and_its_gradient_is_bounded() -> None:
    prediction = torch.tensor([[1e4], [-1e4]], requires_grad=True)
    loss = create_regression_loss(RegressionLossConfig(name=RegressionLoss.LOGCOSH))(prediction, torch.zeros(2, 1))
    loss.backward()
    assert torch.isfinite(loss) and prediction.grad is not None and prediction.grad.abs().max() <= 0.5 + 1e-6
