"""Pretraining's pieces: the segmentation U-Net or a classification network's feature extractor as a
masked autoencoder, its chain, its loss, and the weights file its package stage writes for
``model.init_from``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.transforms import Compose, EnsureTyped, RandSpatialCropSamplesd, Resized
from torch import nn

from medseg.config import config_to_dict
from medseg.data.transforms import augmentation, preprocessing
from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.image_networks import IMAGE_NETWORKS
from medseg.engine.models import create_model
from medseg.tasks.pretraining.config import PRETRAINED_IMAGE_NETWORKS, PretrainingConfig, is_image_network
from medseg.tasks.pretraining.encoder import PretrainedWeights, write_pretrained
from medseg.tasks.pretraining.image_encoder import MaskedImageAutoencoder, feature_stages
from medseg.tasks.pretraining.masking import IMAGE, LABEL, MaskedReconstructionLoss, RandBlockMaskd
from medseg.tasks.registry import get_task

log = logging.getLogger(__name__)

#: The task whose networks pretraining trains, and whose runs its weights start: the U-Nets'.
NETWORK_TASK = "segmentation"
#: ... and the whole-image networks' (regression builds the same networks, under the same names).
IMAGE_NETWORK_TASK = "classification"


def network_task(cfg: PretrainingConfig) -> str:
    """The task whose runs the weights start: classification for a whole-image network."""
    return IMAGE_NETWORK_TASK if is_image_network(cfg.model) else NETWORK_TASK


def build_network(cfg: PretrainingConfig) -> nn.Module:
    """The network ``cfg.model`` describes, reconstructing every input channel: a segmentation U-Net
    with one output per channel (every other tensor named and shaped as in the segmentation run), or
    a classification network's feature extractor with a light decoder (:mod:`.image_encoder`)."""
    channels, model = len(cfg.data.channels), cfg.model
    if is_image_network(model):
        # the one table of whole-image networks (engine), as the classification task registers it;
        # the head's width does not matter: the head is left out of the autoencoder
        classifier = IMAGE_NETWORKS[model.name](model, channels, 2, cfg.patch.size)
        stages = feature_stages(classifier, model.name, PRETRAINED_IMAGE_NETWORKS)
        return MaskedImageAutoencoder(classifier, stages, channels, cfg.patch.size, model.spatial_dims)
    get_task(NETWORK_TASK)  # importing the task fills the model registry with its networks
    return create_model(NETWORK_TASK, cfg.model.name, cfg.model, channels, channels, cfg.patch.size)


def training_transforms(cfg: PretrainingConfig) -> Compose:
    """Preprocess (cached), then uniform patches, the configured augmentation and the mask (random).

    A classification network sees what its classification run sees: the whole image resized to the
    network input (``patch.size``, that run's ``preprocess.resize``; "area" as classification resizes),
    ``patch.samples_per_volume`` times per epoch, each with its own augmentation and mask."""
    image_network = is_image_network(cfg.model)
    chain = preprocessing(cfg.preprocess, keys=(IMAGE,), min_size=None if image_network else cfg.patch.size)
    if image_network:
        chain.append(Resized(keys=IMAGE, spatial_size=list(cfg.patch.size), mode="area"))
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
    about = {"run_id": run_id, "network_task": network_task(cfg), "in_channels": len(cfg.data.channels),
             "network": {"model": config_to_dict(cfg)["model"], "patch_size": list(cfg.patch.size)},
             "masking": config_to_dict(cfg)["masking"], "preprocess": config_to_dict(cfg)["preprocess"],
             "manifest": str(cfg.data.manifest)}
    written = write_pretrained(net, str(cfg.masking.transfer), (run_dir / WEIGHTS).parent, about)
    log.info("pretrained weights: %s (%d tensors, %s); start a %s run from them with --set model.init_from=%s",
             written.weights, len(written.tensors), cfg.masking.transfer, network_task(cfg), written.weights)
    return written


def pretraining_contract(cfg: PretrainingConfig) -> dict[str, Any]:
    """What the weights expect of the fine-tuning run's images (its preprocessing should match)."""
    return {"patch_size": list(cfg.patch.size), "masking": config_to_dict(cfg)["masking"]}
