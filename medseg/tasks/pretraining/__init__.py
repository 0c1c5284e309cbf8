"""Pretraining: a masked autoencoder on every image the user has, labelled or not, whose weights
start a segmentation or a classification run (``model.init_from``).

The network is the segmentation task's own U-Net (from the one model registry), or a classification
network's feature extractor (ResNet, DenseNet, LeNet, AlexNet, VGG, GoogLeNet: ``image_encoder``) with
a light decoder, trained to fill in blanked blocks of each patch or image (``masking``: masked image
modelling, L1/L2 on the masked voxels); the engine's loop gives it budgets, checkpoints and exact
resume. Its package stage writes ``pretrained/pretrained.safetensors`` (the encoder, or for a U-Net
everything but the output head, under the fine-tuning network's tensor names) and a JSON sidecar
naming the run, which a fine-tuning run's ``model.init_from`` loads and records (the run also logs
the whole network as its MLflow model, as every run does). :data:`TASK` is what the registry hands
out under ``pretraining``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.tasks.base import TaskBase
from medseg.tasks.pretraining.config import PretrainingConfig


class PretrainingTask(TaskBase):
    """The :class:`~medseg.tasks.base.Task` of pretraining."""

    name = "pretraining"
    config_type = PretrainingConfig
    selection_metric = "val/none"  # nothing validates: the last weights are the pretrained ones
    evaluated_splits = ()
    headline_metrics = ("^train/loss$",)
    uses_labels = False

    def build_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.pretraining.training import build_network

        return build_network(cfg)

    def describe_input(self, cfg: Any) -> str:
        return (f"patch {list(cfg.patch.size)}, {cfg.masking.ratio:.0%} masked in blocks of "
                f"{list(cfg.masking.block)}")

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        from medseg.tasks.pretraining.training import training_transforms

        return training_transforms(cfg), None

    def create_loss(self, cfg: Any) -> nn.Module:
        from medseg.tasks.pretraining.training import create_loss

        return create_loss(cfg)

    def records(self, ctx: Any, split: str) -> list[dict[str, Any]]:
        """Every case of the manifest trains, whatever its split, and nothing validates."""
        from medseg.data.datasets import records
        from medseg.data.manifest import read_manifest

        return records(read_manifest(ctx.manifest).cases, ctx.root, with_label=False) if split == "train" else []

    def verify_options(self, cfg: Any) -> Any:
        """The images are checked as every task's; labels, if the manifest has any, are not required
        (a classification network's manifest holds class indices there, a U-Net's label-map paths)."""
        from medseg.data.verify import VerifyOptions
        from medseg.tasks.pretraining.config import is_image_network

        return VerifyOptions(labels=None, require_labels_for=(), expected_channels=len(cfg.data.channels),
                             spatial_dims=cfg.model.spatial_dims, class_labels=is_image_network(cfg.model),
                             cross_split_duplicates=cfg.data.cross_split_duplicates,
                             allow_constant=cfg.preprocess.allow_constant)

    def contract_extras(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.pretraining.training import pretraining_contract

        return pretraining_contract(cfg)

    def package_extras(self, ctx: Any, checkpoint: Any) -> None:
        """The pretrained weights for ``model.init_from`` (``pretrained/``) and their sidecar, logged;
        the run tagged as a pretraining run that made them."""
        from medseg.tasks.pretraining.training import export_weights

        written = export_weights(ctx.cfg, checkpoint, ctx.run_dir, ctx.tracker.run_id)
        for path in (written.weights, written.metadata):
            ctx.tracker.log_artifact(path, "pretrained")
        ctx.tracker.set_tags({"medseg.kind": "pretraining", "medseg.pretrained_weights": str(written.weights.resolve()),
                              "medseg.pretrained_tensors": str(len(written.tensors))})
        ctx.metrics["pretrain/tensors"] = float(len(written.tensors))

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.errors import UsageError

        raise UsageError("a pretraining run makes weights to start a segmentation or classification run from "
                         "(model.init_from), not a model to predict with; fine-tune it with `medseg run`")


TASK = PretrainingTask()

__all__ = ["TASK", "PretrainingConfig", "PretrainingTask"]
