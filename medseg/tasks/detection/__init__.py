"""Detection: boxes and confidences for lesions (nodules, metastases), with MONAI's RetinaNet.

Everything detection-specific lives in this package: boxes and their conversions (``boxes``),
box files (``box_files``), FROC and mAP (``metrics``), the config (``config``), the network and
detector (``networks``), the loss (``losses``), chains (``transforms``), the stages' pieces
(``training``), one scan's prediction (``predict``), box fusion over an ensemble and TTA flips
(``fusion``), a synthetic lesion set (``synthetic``) and the planner rule (``planner``).
:data:`TASK` is what the registry hands out under ``detection``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.tasks.base import TaskBase
from medseg.tasks.detection.config import DetectionConfig


class DetectionTask(TaskBase):
    """The :class:`~medseg.tasks.base.Task` of detection."""

    name = "detection"
    config_type = DetectionConfig
    selection_metric = "val/froc"
    predict_options = frozenset({"tta", "qc"})
    headline_metrics = ("/sensitivity_at_", "/froc$", "/map_iou")

    def build_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.detection.networks import build_retinanet, check_divisible

        check_divisible(cfg.patch.size, cfg.model, "patch.size")
        if cfg.detect.window is not None:
            check_divisible(cfg.detect.window, cfg.model, "detect.window")
        return build_retinanet(cfg.model, len(cfg.data.channels), len(cfg.data.labels) - 1)

    def describe_input(self, cfg: Any) -> str:
        return f"patch {list(cfg.patch.size)}, {len(cfg.model.anchor_shapes)} anchor shapes, " \
               f"boxes from {cfg.data.boxes.file or 'label-map components'}"

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        from medseg.tasks.detection.transforms import training_transforms, validation_transforms

        return training_transforms(cfg), validation_transforms(cfg)

    def create_loss(self, cfg: Any) -> nn.Module:
        from medseg.tasks.detection.losses import RetinaNetLoss

        return RetinaNetLoss(cfg)

    def records(self, ctx: Any, split: str) -> list[dict[str, Any]]:
        """The split's cases; with a box file their label maps (if any) are not read."""
        from medseg.data.datasets import records
        from medseg.data.manifest import read_manifest
        from medseg.engine.loop import split_cases

        cases = split_cases(ctx.cfg, read_manifest(ctx.manifest), split)
        return records(cases, ctx.root, with_label=ctx.cfg.data.boxes.file is None)

    def evaluation_items(self, ctx: Any, split: str) -> list[dict[str, Any]]:
        """Every case of the split: a scan without boxes is a negative case, where false positives count."""
        return self.records(ctx, split)

    def verify_options(self, cfg: Any) -> Any:
        """Images checked as every task's; label maps (where boxes come from them) hold ``data.labels``'
        values, and negative cases (no label map, or an empty one) are allowed."""
        import dataclasses

        options = super().verify_options(cfg)
        if cfg.data.boxes.file is not None:
            return dataclasses.replace(options, labels=None, require_labels_for=())
        return dataclasses.replace(options, require_labels_for=())

    def prepare_data(self, cfg: Any, root: Path, progress: bool) -> None:
        """Write the synthetic lesion set of ``data.synthetic`` (an identical set on disk is kept)."""
        if cfg.data.synthetic is None:
            return
        from medseg.tasks.detection.synthetic import write_lesion_dataset

        write_lesion_dataset(cfg.data.synthetic, root, cfg.data.manifest, progress)

    def validation(self, ctx: Any) -> Any:
        from medseg.tasks.detection.training import validation

        return validation(ctx.cfg)

    def score_split(self, ctx: Any, evaluator: Any) -> Any:
        from medseg.tasks.detection.training import score_split

        return score_split(ctx.cfg, evaluator)

    def contract_extras(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.detection.training import model_contract

        return model_contract(cfg)

    def packaged_contract(self, ctx: Any) -> dict[str, Any]:
        """The contract, with the QC thresholds (:mod:`medseg.tasks.detection.qc`): how many confident
        boxes are unusually many follows from the validation scans' lesion counts."""
        from medseg.tasks.detection.qc import contract_qc

        contract = super().packaged_contract(ctx)
        contract["qc"] = contract_qc(ctx.run_dir / "evaluation" / "val_cases.csv")
        return contract

    def plan(self, request: Any, fingerprint: Any) -> Any:
        from medseg.tasks.detection.planner import plan

        return plan(self, request, fingerprint)

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.tasks.detection.predict import DetectionPredictor

        return DetectionPredictor(model, options, device)


TASK = DetectionTask()

__all__ = ["TASK", "DetectionConfig", "DetectionTask"]
