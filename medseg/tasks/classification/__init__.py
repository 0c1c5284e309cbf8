"""Classification: 2D/3D CNNs (MLP, LeNet, ResNet, DenseNet) on whole, resized images.

Everything classification-specific lives in this package: its config (``config``), networks
(``networks``), transfer learning (``transfer``), losses and metrics (``metrics``), the train /
evaluate / package stages (``training``) and the prediction of one image (``predict``).
:data:`TASK` is what the registry hands out under the name ``classification``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.tasks.base import TaskBase
from medseg.tasks.classification import networks as _networks  # noqa: F401 - fills the model registry
from medseg.tasks.classification.config import ClassificationConfig


class ClassificationTask(TaskBase):
    """The :class:`~medseg.tasks.base.Task` of classification."""

    name = "classification"
    config_type = ClassificationConfig
    predict_options = frozenset({"tta"})
    selection_metric = "val/auc"
    headline_metrics = ("/auc$", "/acc$")
    class_labels = True

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        return torch.zeros(2, int(contract["in_channels"]), *[int(s) for s in contract["resize"]]), False

    def plan(self, request: Any, fingerprint: Any) -> Any:
        from medseg.tasks.classification.planner import plan

        return plan(self, request, fingerprint)

    def build_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.classification.training import build_classifier

        return build_classifier(cfg)

    def describe_input(self, cfg: Any) -> str:
        return f"input {list(cfg.preprocess.resize or [])}"

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        from medseg.tasks.classification.transforms import classification_transforms

        return (classification_transforms(cfg.preprocess, cfg.augment, cfg.model.spatial_dims),
                classification_transforms(cfg.preprocess, (), cfg.model.spatial_dims))

    def create_loss(self, cfg: Any) -> nn.Module:
        from medseg.tasks.classification.metrics import create_classification_loss

        weights = cfg.loss.class_weights if isinstance(cfg.loss.class_weights, list) else None
        return create_classification_loss(cfg.loss, weights)

    def training_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.classification.training import build_classifier

        return build_classifier(cfg, pretrained=True)  # model.init_from and model.freeze apply

    def training_loss(self, ctx: Any) -> nn.Module:
        from medseg.data.manifest import read_manifest
        from medseg.engine.loop import split_cases
        from medseg.tasks.classification.training import training_loss

        return training_loss(ctx.cfg, split_cases(ctx.cfg, read_manifest(ctx.manifest), "train"), ctx.tracker)

    def validation(self, ctx: Any) -> Any:
        from medseg.tasks.classification.training import validation

        return validation(ctx.cfg)

    def score_split(self, ctx: Any, evaluator: Any) -> Any:
        """The checkpoint with the best validation AUC, scored on a split (the t-SNE map on test)."""
        from medseg.tasks.classification.training import score_split

        return score_split(ctx.cfg, evaluator, tsne=evaluator.split == "test" and ctx.cfg.validation.tsne,
                           fit_calibration=evaluator.split == "val")

    def contract(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.classification.training import model_contract

        return model_contract(cfg)

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.tasks.classification.predict import ClassificationPredictor

        return ClassificationPredictor(model, options, device)


TASK = ClassificationTask()

__all__ = ["TASK", "ClassificationConfig", "ClassificationTask"]
