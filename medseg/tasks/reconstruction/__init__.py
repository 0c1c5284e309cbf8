"""Reconstruction: undersampled MRI, sparse-view CT and denoising with residual U-Nets.

Everything reconstruction-specific lives in this package: its config (``config``), the
simulated acquisitions, losses and metrics (``operators``), networks (``networks``), transforms,
phantoms, validation and scoring a split (``training``) and the reconstruction of one
image (``predict``). :data:`TASK` is what the registry hands out under the name ``reconstruction``.
``recon.problem: translation`` (one contrast synthesised from others) brings its own transforms,
network, scoring, contract and predictor (``translation*``), chosen where each piece is handed out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from medseg.tasks.base import TaskBase
from medseg.tasks.reconstruction import networks as _networks  # noqa: F401 - fills the model registry
from medseg.tasks.reconstruction.config import ReconstructionConfig


class ReconstructionTask(TaskBase):
    """The :class:`~medseg.tasks.base.Task` of reconstruction."""

    name = "reconstruction"
    config_type = ReconstructionConfig
    #: ``tta``: super-resolution averages over its trained in-plane flips (the predictor refuses it for the
    #: other problems); translation always does (its uncertainty map is the flips' spread)
    predict_options = frozenset({"measured", "tta"})
    selection_metric = "val/ssim"
    evaluated_splits = (("val", "best_val"), ("test", "test"), ("real", "real"))
    headline_metrics = ("/psnr$", "/ssim$", "_psnr$", "_ssim$")
    uses_labels = False  # the images are the targets
    #: Simulating a measurement (masks and FFTs, or noise) for every slice is per-sample work of the
    #: order of the training step: two loader workers overlap it with the step (benchmarks/results/recon.md
    #: times this data path against a plain MONAI pipeline).
    loader_workers = 2

    def export_example(self, contract: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        from medseg.tasks.reconstruction.operators import MRI_CHANNELS

        recon = contract["recon"]
        # translation: the input contrasts (its in_channels counts the target too: what a case holds)
        channels = MRI_CHANNELS if recon.get("problem") == "mri" else len(contract.get("input_channels", [None]))
        if recon.get("problem") == "sr":  # 2.5D: a slice and its neighbours on either side
            channels = 2 * int(recon.get("sr", {}).get("context", 0)) + 1
        return torch.zeros(2, channels, *[int(s) for s in recon["image_size"]]), True

    def plan(self, request: Any, fingerprint: Any) -> Any:
        from medseg.tasks.reconstruction.planner import plan

        return plan(self, request, fingerprint)

    def build_network(self, cfg: Any) -> nn.Module:
        from medseg.tasks.reconstruction.training import build_network
        from medseg.tasks.reconstruction.translation_training import build_translation_network

        return build_translation_network(cfg) if _translating(cfg) else build_network(cfg)

    def describe_input(self, cfg: Any) -> str:
        return f"{cfg.recon.problem} slices {list(cfg.recon.image_size)}"

    def transforms(self, cfg: Any) -> tuple[Compose, Compose | None]:
        from medseg.tasks.reconstruction.operators import Acquisition
        from medseg.tasks.reconstruction.transforms import (
            reconstruction_eval_transforms,
            reconstruction_training_transforms,
        )
        from medseg.tasks.reconstruction.translation_transforms import (  # translation
            translation_eval_transforms,
            translation_training_transforms,
        )

        if _translating(cfg):
            return (translation_training_transforms(cfg.preprocess, cfg.recon, cfg.data.channels, cfg.augment),
                    translation_eval_transforms(cfg.preprocess, cfg.recon, cfg.data.channels))
        return (reconstruction_training_transforms(cfg.preprocess, cfg.recon, cfg.augment, Acquisition(cfg.recon)),
                reconstruction_eval_transforms(cfg.preprocess, cfg.recon))

    def create_loss(self, cfg: Any) -> nn.Module:
        from medseg.tasks.reconstruction.operators import create_reconstruction_loss

        return create_reconstruction_loss(cfg.loss)

    def verify_options(self, cfg: Any) -> Any:
        """The images are the targets: labels, if listed, are not used, and 2D networks take slices
        of volumes, so neither labels nor dimensions are checked."""
        from medseg.data.verify import VerifyOptions

        return VerifyOptions(labels=None, require_labels_for=(), expected_channels=len(cfg.data.channels),
                             spatial_dims=None, cross_split_duplicates=cfg.data.cross_split_duplicates,
                             allow_constant=cfg.preprocess.allow_constant)

    def prepare_data(self, cfg: Any, root: Path, progress: bool) -> None:
        """Write the random-ellipse phantoms of ``recon.phantoms`` (an identical set on disk is kept)."""
        if cfg.recon.phantoms is None:
            return
        import logging

        from medseg.tasks.reconstruction.phantoms import write_phantoms

        made = write_phantoms(cfg.recon.phantoms, cfg.data.manifest, root, progress)
        logging.getLogger(__name__).info("%s %d phantoms in %s (manifest %s)",
                                         "wrote" if made.generated else "reusing", made.cases, made.data_dir,
                                         made.manifest)

    def evaluation_items(self, ctx: Any, split: str) -> list[dict[str, Any]]:
        """The split's volumes; the split ``real`` is the real images ``recon.real_images`` lists."""
        from medseg.tasks.reconstruction.training import resolve_real_images

        return resolve_real_images(ctx.cfg, ctx.root) if split == "real" else super().evaluation_items(ctx, split)

    def validation(self, ctx: Any) -> Any:
        from medseg.tasks.reconstruction.training import validation
        from medseg.tasks.reconstruction.translation_training import translation_validation

        return translation_validation(ctx.cfg) if _translating(ctx.cfg) else validation(ctx.cfg)

    def score_split(self, ctx: Any, evaluator: Any) -> Any:
        """The network beside the classical baseline on whole volumes."""
        from medseg.tasks.reconstruction.training import score_split
        from medseg.tasks.reconstruction.translation_training import score_translation_split

        if _translating(ctx.cfg):  # the network beside histogram matching, and where it is trusted
            return score_translation_split(ctx.cfg, evaluator, self.records(ctx, "train"))
        return score_split(ctx.cfg, evaluator)

    def contract(self, cfg: Any) -> dict[str, Any]:
        from medseg.tasks.reconstruction.training import model_contract
        from medseg.tasks.reconstruction.translation_training import translation_contract

        return translation_contract(cfg) if _translating(cfg) else model_contract(cfg)

    def packaged_contract(self, ctx: Any) -> dict[str, Any]:
        """Translation: with the training targets' quantiles and the trusted threshold the evaluation found."""
        from medseg.tasks.reconstruction.translation_training import packaged_translation_contract

        return packaged_translation_contract(ctx.cfg, ctx.run_dir) if _translating(ctx.cfg) else super().packaged_contract(ctx)

    def case_predictor(self, model: Any, options: Any, device: torch.device) -> Any:
        from medseg.tasks.reconstruction.predict import ReconstructionPredictor
        from medseg.tasks.reconstruction.translation_predict import TranslationPredictor

        if model.contract["recon"].get("problem") == "translation":
            return TranslationPredictor(model, options, device)
        return ReconstructionPredictor(model, options, device)


def _translating(cfg: Any) -> bool:
    """``recon.problem: translation``: its own transforms, network, scoring and predictor (translation*.py)."""
    return str(cfg.recon.problem) == "translation"


TASK = ReconstructionTask()

__all__ = ["TASK", "ReconstructionConfig", "ReconstructionTask"]
