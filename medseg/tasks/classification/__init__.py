"""Classification: 2D/3D CNNs (MLP, LeNet, ResNet, DenseNet) on whole, resized images.

Everything classification-specific lives in this package: its config (``config``), networks
(``networks``), transfer learning (``transfer``), losses and metrics (``metrics``), the train /
evaluate / package stages (``training``) and the prediction of one image (``predict``).
:data:`TASK` is what the registry hands out under the name ``classification``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.engine.loop import has_labelled_cases
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

    def evaluate(self, ctx: Any, checkpoint: Path, split: str, prefix: str) -> dict[str, float]:
        """The checkpoint with the best validation AUC, scored on ``split`` (the t-SNE map on test)."""
        from medseg.tasks.classification import training

        if not has_labelled_cases(ctx.cfg, ctx.manifest, split):
            return {}
        return training.evaluate(ctx.cfg, ctx.manifest, ctx.root, checkpoint, ctx.run_dir, split, ctx.tracker,
                                 ctx.progress, prefix=prefix,
                                 tsne=split == "test" and ctx.cfg.validation.tsne,
                                 fit_calibration=split == "val").metrics

    def train(self, ctx: Any) -> Any:
        from medseg.tasks.classification import training

        return training.train(ctx.cfg, ctx.manifest, ctx.root, ctx.run_dir, ctx.tracker, resume=ctx.resume,
                              progress=ctx.progress)

    def contract(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.classification.training import model_contract

        return model_contract(cfg)

    def package(self, ctx: Any, checkpoint: Path) -> Any:
        from medseg.tasks.classification import training

        return training.package(ctx.cfg, checkpoint, ctx.run_dir, ctx.tracker)

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.tasks.classification.predict import ClassificationPredictor

        return ClassificationPredictor(model, options, device)


TASK = ClassificationTask()

__all__ = ["TASK", "ClassificationConfig", "ClassificationTask"]
