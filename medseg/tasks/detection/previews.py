"""Validation pictures: a slice of a few validation scans with their reference boxes (green) and the
network's most confident boxes (red, brighter for higher scores), logged as MLflow images at every
validation so that the run page's image slider shows the detector learning."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.data.transforms import IMAGE
from medseg.tasks.detection.boxes import Boxes
from medseg.tasks.detection.config import DetectionConfig
from medseg.tasks.detection.detect import detect_boxes, window_of
from medseg.tasks.detection.transforms import BOX_CLASSES, BOXES

#: Scans pictured per validation, and predicted boxes drawn per picture.
PREVIEW_SCANS = 2
PREVIEW_BOXES = 3


def _grey(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, (1, 99))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _outline(picture: np.ndarray, box: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Draw ``box`` (x0, y0, x1, y1 in pixels, end exclusive) onto ``picture`` (x, y, 3), in place."""
    x0, y0 = (int(np.clip(v, 0, s - 1)) for v, s in zip(box[:2], picture.shape[:2]))
    x1, y1 = (int(np.clip(np.ceil(v) - 1, 0, s - 1)) for v, s in zip(box[2:], picture.shape[:2]))
    picture[x0:x1 + 1, [y0, y1]] = colour
    picture[[x0, x1], y0:y1 + 1] = colour


def draw_boxes(image: np.ndarray, reference: Boxes, predicted: Boxes) -> np.ndarray:
    """An RGB picture (H, W, 3) of a 2D image, or of the 3D slice through the first reference box's
    centre (else the best prediction's), with the boxes that cross it."""
    dims = reference.dims
    if dims == 3:
        anchor = reference.corners[0] if len(reference) else predicted.corners[0] if len(predicted) else None
        z = int((anchor[2] + anchor[5]) / 2) if anchor is not None else image.shape[-1] // 2
        z = min(max(z, 0), image.shape[-1] - 1)
        plane, crossing = image[..., z], lambda b: b[2] <= z < b[5]
    else:
        plane, crossing = image, lambda b: True
    picture = _grey(np.asarray(plane, dtype=np.float32))
    for box in reference.corners:
        if crossing(box):
            _outline(picture, box[[0, 1, dims, dims + 1]], (0, 220, 0))
    scores = predicted.scores if predicted.scores is not None else np.ones(len(predicted))
    for box, score in list(zip(predicted.corners, scores))[:PREVIEW_BOXES]:
        if crossing(box):
            _outline(picture, box[[0, 1, dims, dims + 1]], (int(80 + 175 * score), 0, 0))
    return np.ascontiguousarray(np.transpose(picture, (1, 0, 2))[::-1])  # rows = y, anterior up


def previewer(cfg: DetectionConfig) -> Any:
    """The :data:`~medseg.engine.loop.Previewer` of detection: :func:`draw_boxes` on the first scans."""
    def preview(network: nn.Module, dataset: Any, device: torch.device,
                amp_dtype: torch.dtype | None) -> dict[str, np.ndarray]:
        pictures = {}
        for index in range(min(PREVIEW_SCANS, len(dataset))):
            item = dataset[index]
            found = detect_boxes(network, item[IMAGE], cfg.model, len(cfg.data.labels) - 1, cfg.detect,
                                 window_of(cfg), device, amp_dtype)
            dims = cfg.model.spatial_dims
            reference = Boxes(np.asarray(item[BOXES], dtype=np.float64).reshape(-1, 2 * dims),
                              np.asarray(item[BOX_CLASSES], dtype=np.int64))
            pictures[f"val/boxes/{item.get('case_id', index)}"] = draw_boxes(
                np.asarray(item[IMAGE])[0], reference, found)
        return pictures

    return preview
