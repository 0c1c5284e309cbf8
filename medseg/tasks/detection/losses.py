"""RetinaNet's training loss as the engine's loop calls a loss: ``loss(network output, batch label)``.

The network's output is its head maps; the label is the batch's packed box tables
(:mod:`medseg.tasks.detection.transforms`). The rest is MONAI's detector: anchors for the patch
size, ATSS matching of anchors to boxes, the hard negative sampler, the classification (BCE) and
box-regression (smooth L1 on encoded offsets) losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medseg.tasks.detection.config import DetectionConfig
from medseg.tasks.detection.networks import build_detector
from medseg.tasks.detection.transforms import unpack_boxes


class RetinaNetLoss(nn.Module):
    """Classification loss + ``loss.box_weight`` x box-regression loss of a batch of patches.

    The detector inside holds no weights (a stand-in network): the loop's network produced the maps.
    """

    def __init__(self, cfg: DetectionConfig):
        super().__init__()
        num_classes = len(cfg.data.labels) - 1
        self.detector = build_detector(nn.Identity(), cfg.model, num_classes)
        self.detector.set_atss_matcher(num_candidates=cfg.loss.atss_candidates, center_in_gt=False)
        self.detector.set_hard_negative_sampler(batch_size_per_image=cfg.loss.negatives_per_image,
                                                positive_fraction=cfg.loss.positive_fraction, pool_size=20,
                                                min_neg=16)
        self.patch = tuple(cfg.patch.size)
        self.box_weight = cfg.loss.box_weight

    def forward(self, head_outputs: dict[str, Any], packed: torch.Tensor) -> torch.Tensor:
        detector = self.detector
        cls_maps, box_maps = head_outputs[detector.cls_key], head_outputs[detector.box_reg_key]
        # anchors depend on the input's shape only: a shape on the meta device allocates nothing
        images = torch.empty((cls_maps[0].shape[0], 1, *self.patch), device="meta")
        detector.generate_anchors(images, {detector.cls_key: cls_maps})
        locations = [m.shape[2:].numel() for m in cls_maps]
        # MONAI's own flattening of the per-level maps (the detector's forward does the same)
        reshaped = {detector.cls_key: detector._reshape_maps([m.float() for m in cls_maps]),
                    detector.box_reg_key: detector._reshape_maps([m.float() for m in box_maps])}
        anchors = detector.anchors if detector.anchors is not None else []  # set by generate_anchors
        losses = detector.compute_loss(reshaped, unpack_boxes(packed), anchors, locations)
        return losses[detector.cls_key] + self.box_weight * losses[detector.box_reg_key]
