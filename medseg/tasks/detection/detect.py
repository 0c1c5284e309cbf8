"""One preprocessed scan searched by a detection network, as validation, evaluation and predict all
search it: MONAI's sliding-window detector over the whole grid, boxes decoded, scored and fused by NMS."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medseg.engine.runtime import autocast
from medseg.tasks.detection.boxes import Boxes
from medseg.tasks.detection.config import DetectConfig, DetectionConfig, DetectionModelConfig
from medseg.tasks.detection.networks import scan_detector


@torch.no_grad()
def detect_boxes(network: nn.Module, image: torch.Tensor, model: DetectionModelConfig, num_classes: int,
                 detect: DetectConfig, window: tuple[int, ...], device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> Boxes:
    """One preprocessed scan ``(C, *spatial)`` searched by ``network``: boxes on its grid, class
    values (index + 1) and scores, best first."""
    detector = scan_detector(network, model, num_classes, detect, window)
    was_training = network.training
    network.eval()
    try:
        with autocast(amp_dtype, device):
            found = detector([torch.as_tensor(image).float().to(device)], use_inferer=True)[0]
    finally:
        network.train(was_training)
    return Boxes(found[detector.target_box_key].float().cpu().numpy().astype(np.float64),
                 found[detector.target_label_key].cpu().numpy().astype(np.int64) + 1,
                 found[detector.pred_score_key].float().cpu().numpy().astype(np.float64))


def window_of(cfg: DetectionConfig) -> tuple[int, ...]:
    """The sliding window: ``detect.window``, else the training patch."""
    return tuple(cfg.detect.window or cfg.patch.size)
