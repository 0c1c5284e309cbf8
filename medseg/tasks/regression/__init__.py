"""Regression: one or several continuous values per image (a structure's volume in mL, a grade),
from the whole image, with the classification backbones and a linear head.

Everything regression-specific lives in this package: its config (``config``), networks
(``networks``), target normalisation (``normalisation``), losses (``losses``), metrics
(``metrics``), chains (``transforms``), the stages' pieces (``training``) and the prediction of one
image (``predict``). The targets come from the manifest's ``target*`` columns or a CSV
(:mod:`medseg.data.targets`). :data:`TASK` is what the registry hands out under ``regression``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.tasks.base import TaskBase
from medseg.tasks.regression import networks as _networks  # noqa: F401 - fills the model registry
from medseg.tasks.regression.config import RegressionConfig


class RegressionTask(TaskBase):
    """The :class:`~medseg.tasks.base.Task` of regression."""

    name = "regression"
    config_type = RegressionConfig
    predict_options = frozenset({"tta"})
    selection_metric = "val/neg_nmae"
    headline_metrics = ("/mae$", "/r2$", "/qwk$")
    uses_labels = False  # the manifest's label column (a label map, a class) is not the target

    def build_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.regression.networks import create_regressor

        return create_regressor(cfg)

    def describe_input(self, cfg: Any) -> str:
        return f"input {list(cfg.preprocess.size)} ({cfg.preprocess.fit}), targets {list(cfg.data.targets.columns)}"

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        from medseg.tasks.regression.transforms import regression_transforms

        return (regression_transforms(cfg.preprocess, cfg.augment, cfg.model.spatial_dims),
                regression_transforms(cfg.preprocess, (), cfg.model.spatial_dims))

    def create_loss(self, cfg: Any) -> nn.Module:
        from medseg.engine.image_networks import with_auxiliary_heads
        from medseg.tasks.regression.losses import create_regression_loss

        return with_auxiliary_heads(create_regression_loss(cfg.loss), cfg.model)

    def verify_options(self, cfg: Any) -> Any:
        """The images checked as every task's are; the label column, which regression does not learn,
        only as what it holds (class indices, as a MedMNIST import writes, or label maps)."""
        import dataclasses

        from medseg.data.manifest import read_manifest

        labels = [str(c.label) for c in read_manifest(cfg.data.manifest).cases if c.label]
        indices = bool(labels) and all(label.lstrip("-").isdigit() for label in labels)
        return dataclasses.replace(super().verify_options(cfg), class_labels=indices, require_labels_for=())

    def records(self, ctx: Any, split: str) -> list[dict[str, Any]]:
        """The split's cases, each with its normalised targets as ``label`` (all must have them)."""
        from medseg.tasks.regression.training import fit_normaliser, target_table, with_targets

        table = target_table(ctx.cfg)
        return with_targets(super().records(ctx, split), table, fit_normaliser(ctx.cfg, ctx.manifest, table))

    def evaluation_items(self, ctx: Any, split: str) -> list[dict[str, Any]]:
        """The split's cases that have targets (an evaluated split may hold unmeasured ones)."""
        from medseg.tasks.regression.training import fit_normaliser, target_table, with_targets

        table = target_table(ctx.cfg)
        return with_targets(super().evaluation_items(ctx, split), table,
                            fit_normaliser(ctx.cfg, ctx.manifest, table), require=False)

    def validation(self, ctx: Any) -> Any:
        from medseg.tasks.regression.training import fit_normaliser, validation

        return validation(ctx.cfg, fit_normaliser(ctx.cfg, ctx.manifest))

    def score_split(self, ctx: Any, evaluator: Any) -> Any:
        from medseg.tasks.regression.training import fit_normaliser, score_split

        return score_split(fit_normaliser(ctx.cfg, ctx.manifest), evaluator)

    def contract_extras(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.regression.training import model_contract

        return model_contract(cfg)

    def packaged_contract(self, ctx: Any) -> dict[str, Any]:
        """The contract with the training split's target statistics, which prediction denormalises by."""
        from medseg.tasks.regression.training import fit_normaliser

        return {**self.contract(ctx.cfg), "targets": fit_normaliser(ctx.cfg, ctx.manifest).to_contract()}

    def plan(self, request: Any, fingerprint: Any) -> Any:
        from medseg.tasks.regression.planner import plan

        return plan(self, request, fingerprint)

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        return torch.zeros(2, int(contract["in_channels"]), *[int(s) for s in contract["size"]]), False

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.tasks.regression.predict import RegressionPredictor

        return RegressionPredictor(model, options, device)


TASK = RegressionTask()

__all__ = ["TASK", "RegressionConfig", "RegressionTask"]
