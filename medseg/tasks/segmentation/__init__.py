"""Segmentation: a U-Net trained on patches, validated on whole volumes by sliding window.

Everything segmentation-specific lives in this package: its config (``config``), networks
(``networks``), losses and metrics (``metrics``), the train / evaluate / package stages
(``training``: validation, scoring a split, what the packaged contract adds) and the prediction of one scan (``predict``). :data:`TASK` is what the registry
hands out under the name ``segmentation``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.tasks.base import TaskBase
from medseg.tasks.segmentation import networks as _networks  # noqa: F401 - fills the model registry
from medseg.tasks.segmentation.config import SegmentationConfig


class SegmentationTask(TaskBase):
    """The :class:`~medseg.tasks.base.Task` of segmentation."""

    name = "segmentation"
    config_type = SegmentationConfig
    predict_options = frozenset({"tta", "overlap", "save_probabilities", "save_uncertainty", "keep_largest", "qc"})
    selection_metric = "val/dice_mean"
    headline_metrics = ("dice_mean$", "^test/dice/")

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        window = contract.get("sliding_window") or {}
        return torch.zeros(int(window.get("sw_batch_size", 1)), int(contract["in_channels"]),
                           *[int(s) for s in contract["patch_size"]]), True

    def plan(self, request: Any, fingerprint: Any) -> Any:
        from medseg.tasks.segmentation.planner import plan

        return plan(self, request, fingerprint)

    def build_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.segmentation.training import build_network

        return build_network(cfg)

    def describe_input(self, cfg: Any) -> str:
        return f"patch {list(cfg.patch.size)}"

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        from medseg.data.transforms import training_transforms, validation_transforms

        return (training_transforms(cfg.preprocess, cfg.patch, cfg.augment, cfg.model.spatial_dims,
                                    len(cfg.data.labels)), validation_transforms(cfg.preprocess))

    def create_loss(self, cfg: Any) -> nn.Module:
        from medseg.tasks.segmentation.metrics import create_loss
        from medseg.tasks.segmentation.regions import Regions

        return create_loss(cfg.loss, Regions.from_config(cfg.regions))

    def validation(self, ctx: Any) -> Any:
        from medseg.tasks.segmentation.training import validation

        return validation(ctx.cfg)

    def score_split(self, ctx: Any, evaluator: Any) -> Any:
        from medseg.tasks.segmentation.training import score_split

        # the validation split fits the temperature that the test split and the packaged model use
        return score_split(ctx.cfg, evaluator, ctx.tracker, fit_calibration=evaluator.split == "val")

    def packaged_contract(self, ctx: Any) -> dict[str, Any]:
        from medseg.tasks.segmentation.training import packaged_contract

        return packaged_contract(ctx.cfg, super().packaged_contract(ctx), ctx.run_dir, ctx.manifest, ctx.root)

    def contract(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.segmentation.training import model_contract

        return model_contract(cfg)

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.tasks.segmentation.predict import SegmentationPredictor

        return SegmentationPredictor(model, options, device)


TASK = SegmentationTask()

__all__ = ["TASK", "SegmentationConfig", "SegmentationTask"]
