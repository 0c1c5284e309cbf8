"""Pretraining's pieces: the segmentation U-Net as a masked autoencoder, its chain, its loss, and
the weights file its package stage writes for ``model.init_from``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.transforms import Compose, EnsureTyped, RandSpatialCropSamplesd
from torch import nn

from medseg.config import config_to_dict
from medseg.data.transforms import augmentation, preprocessing
from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.models import create_model
from medseg.tasks.pretraining.config import PretrainingConfig
from medseg.tasks.pretraining.encoder import PretrainedWeights, write_pretrained
from medseg.tasks.pretraining.masking import IMAGE, LABEL, MaskedReconstructionLoss, RandBlockMaskd
from medseg.tasks.registry import get_task

log = logging.getLogger(__name__)

#: The task whose networks pretraining trains, and whose runs its weights start.
NETWORK_TASK = "segmentation"


def build_network(cfg: PretrainingConfig) -> nn.Module:
    """The segmentation network ``cfg.model`` describes, with one output per input channel (the
    reconstruction): every other tensor is named and shaped as in the segmentation run."""
    get_task(NETWORK_TASK)  # importing the task fills the model registry with its networks
    channels = len(cfg.data.channels)
    return create_model(NETWORK_TASK, cfg.model.name, cfg.model, channels, channels, cfg.patch.size)


def training_transforms(cfg: PretrainingConfig) -> Compose:
    """Preprocess (cached), then uniform patches, the configured augmentation and the mask (random)."""
    chain = preprocessing(cfg.preprocess, keys=(IMAGE,), min_size=cfg.patch.size)
    chain.append(EnsureTyped(keys=IMAGE, track_meta=False))
    chain.append(RandSpatialCropSamplesd(keys=IMAGE, roi_size=list(cfg.patch.size),
                                         num_samples=cfg.patch.samples_per_volume, random_size=False))
    chain.extend(augmentation(cfg.augment, cfg.model.spatial_dims, keys=(IMAGE,)))
    chain.append(RandBlockMaskd(cfg.masking.block, cfg.masking.ratio))
    chain.append(EnsureTyped(keys=[IMAGE, LABEL], track_meta=False))
    return Compose(chain)


def create_loss(cfg: PretrainingConfig) -> nn.Module:
    return MaskedReconstructionLoss(str(cfg.loss.name))


#: Where a pretraining run's weights for ``model.init_from`` go, inside its run folder.
WEIGHTS = Path("pretrained") / "pretrained.safetensors"


def export_weights(cfg: PretrainingConfig, checkpoint: Path, run_dir: Path, run_id: str | None) -> PretrainedWeights:
    """``run_dir/``:data:`WEIGHTS` and its sidecar from the trained ``checkpoint``."""
    net = build_network(cfg)
    net.load_state_dict(load_checkpoint(checkpoint)["model"])
    about = {"run_id": run_id, "network_task": NETWORK_TASK, "in_channels": len(cfg.data.channels),
             "network": {"model": config_to_dict(cfg)["model"], "patch_size": list(cfg.patch.size)},
             "masking": config_to_dict(cfg)["masking"], "preprocess": config_to_dict(cfg)["preprocess"],
             "manifest": str(cfg.data.manifest)}
    written = write_pretrained(net, str(cfg.masking.transfer), (run_dir / WEIGHTS).parent, about)
    log.info("pretrained weights: %s (%d tensors, %s); start a segmentation run from them with "
             "--set model.init_from=%s", written.weights, len(written.tensors), cfg.masking.transfer, written.weights)
    return written


def pretraining_contract(cfg: PretrainingConfig) -> dict[str, Any]:
    """What the weights expect of the fine-tuning run's images (its preprocessing should match)."""
    return {"patch_size": list(cfg.patch.size), "masking": config_to_dict(cfg)["masking"]}
