"""Box fusion: one scan's boxes from several predictions (the members of a fold or seed ensemble, each
flip of test-time augmentation) made into one list, by non-maximum suppression or by weighted boxes
fusion (WBF, Solovyev, Wang & Gabruseva 2021, "Weighted boxes fusion: ensembling boxes from different
object detection models"), in 2D and 3D.

NMS keeps the best-scored box of every overlapping group and drops the rest; WBF averages each group
into one box, its corners the score-weighted mean of the group's, its score the group's mean score
scaled by the share of predictions that found it (a box only one of four members saw keeps a
quarter of its score). WBF needs no extra library: ``ensemble_boxes`` (the authors' package) is not
among medseg's dependencies and takes coordinates normalised to the image, so the few lines are here.

Coordinates: the boxes of every prediction must be in one frame. Predict fuses on the preprocessed
grid, which every member of an ensemble shares (the contract's spacing and orientation must agree);
that is the same as fusing in world millimetres, since IoU is unchanged by scaling an axis and the
weighted mean commutes with an affine map, and on an oblique grid it is exact where world boxes (the
axis-aligned boxes enclosing the rotated ones) would have grown. ``tests/tasks/detection/test_fusion.py``
checks both against known answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.tasks.detection.boxes import BoxArray, Boxes
from medseg.tasks.detection.config import BoxFusion


def iou_with(box: np.ndarray, others: BoxArray) -> np.ndarray:
    """IoU of one box ``(2 * dims,)`` with each of ``others`` ``(N, 2 * dims)`` (end exclusive)."""
    dims = box.shape[0] // 2
    low = np.maximum(box[:dims], others[:, :dims])
    high = np.minimum(box[dims:], others[:, dims:])
    inter = np.clip(high - low, 0, None).prod(axis=1)
    volume = np.prod(box[dims:] - box[:dims])
    volumes = np.prod(others[:, dims:] - others[:, :dims], axis=1)
    return np.asarray(inter / np.maximum(volume + volumes - inter, 1e-12))


def _concatenate(predictions: Sequence[Boxes]) -> Boxes:
    dims = predictions[0].dims
    corners = np.concatenate([p.corners.reshape(-1, 2 * dims) for p in predictions]).astype(np.float64)
    classes = np.concatenate([p.classes for p in predictions]).astype(np.int64)
    scores = np.concatenate([p.scores if p.scores is not None else np.ones(len(p)) for p in predictions])
    return Boxes(corners, classes, scores.astype(np.float64))


def _best_first(boxes: Boxes, limit: int | None) -> Boxes:
    scores = boxes.scores if boxes.scores is not None else np.ones(len(boxes))
    order = np.argsort(-scores, kind="stable")[:limit]
    return Boxes(boxes.corners[order], boxes.classes[order], scores[order])


def nms_fusion(predictions: Sequence[Boxes], iou: float, limit: int | None = None) -> Boxes:
    """Every prediction's boxes pooled, then per class the best-scored box of each group overlapping
    more than ``iou`` kept (MONAI's ``batched_nms``); best first, at most ``limit``."""
    from monai.data.box_utils import batched_nms

    pooled = _concatenate(predictions)
    if not len(pooled):
        return pooled
    scores = np.asarray(pooled.scores)
    keep = np.asarray(batched_nms(pooled.corners, scores, pooled.classes, iou), dtype=np.int64)
    return _best_first(Boxes(pooled.corners[keep], pooled.classes[keep], scores[keep]), limit)


def weighted_boxes_fusion(predictions: Sequence[Boxes], iou: float, limit: int | None = None) -> Boxes:
    """Weighted boxes fusion of several predictions of one scan (all in one frame).

    Boxes are taken best first; each joins the fused box of its class it overlaps most if that IoU
    exceeds ``iou`` (the fused box then becomes the score-weighted mean of its members' corners), or
    starts a fused box of its own. A fused box scores the mean of its members' scores times
    ``min(members, P) / P`` for ``P`` predictions, so a box few predictions agree on is trusted less.

    Args:
        predictions: one :class:`Boxes` per member and flip, scored.
        iou: the overlap above which a box joins a fused box (0.55 in the paper).
        limit: keep at most this many fused boxes, best first.

    Returns:
        The fused boxes, best first.
    """
    if not predictions:
        raise ValueError("weighted_boxes_fusion: no predictions given")
    pooled = _best_first(_concatenate(predictions), None)
    scores = np.asarray(pooled.scores)
    fused: list[tuple[int, list[int]]] = []  # (class, member indices into pooled)
    fused_corners: list[np.ndarray] = []
    for index in range(len(pooled)):
        same_class = [k for k, (value, _) in enumerate(fused) if value == pooled.classes[index]]
        overlaps = iou_with(pooled.corners[index], np.array([fused_corners[k] for k in same_class])) \
            if same_class else np.zeros(0)
        if len(overlaps) and overlaps.max() > iou:
            target = same_class[int(np.argmax(overlaps))]
            fused[target][1].append(index)
            members = fused[target][1]
            fused_corners[target] = np.average(pooled.corners[members], axis=0, weights=scores[members] + 1e-12)
        else:
            fused.append((int(pooled.classes[index]), [index]))
            fused_corners.append(pooled.corners[index].copy())
    count = len(predictions)
    fused_scores = np.array([scores[m].mean() * min(len(m), count) / count for _, m in fused])
    dims = predictions[0].dims
    corners = np.array(fused_corners).reshape(-1, 2 * dims)
    return _best_first(Boxes(corners, np.array([v for v, _ in fused], dtype=np.int64), fused_scores), limit)


def fuse_boxes(predictions: Sequence[Boxes], method: BoxFusion, iou: float, limit: int | None = None) -> Boxes:
    """One scan's boxes from several predictions: ``method`` over them (one prediction is returned as
    it is, best first, but for ``limit``)."""
    if len(predictions) == 1:
        return _best_first(predictions[0], limit)
    if method == BoxFusion.WBF:
        return weighted_boxes_fusion(predictions, iou, limit)
    return nms_fusion(predictions, iou, limit)


def unflip_boxes(boxes: Boxes, axes: Sequence[int], shape: Sequence[int]) -> Boxes:
    """Boxes found on an image flipped along spatial ``axes`` (of ``shape``), put back on the unflipped
    image: along a flipped axis of n voxels, ``[start, end)`` becomes ``[n - end, n - start)``."""
    corners = boxes.corners.copy()
    dims = boxes.dims
    for axis in axes:
        start, end = corners[:, axis].copy(), corners[:, dims + axis].copy()
        corners[:, axis], corners[:, dims + axis] = shape[axis] - end, shape[axis] - start
    return Boxes(corners, boxes.classes, boxes.scores)
