"""Detection metrics: FROC (sensitivity at 1, 2 and 4 false positives per scan, as LUNA16 reports
it) and COCO average precision at IoU 0.1 and 0.5, both from MONAI's matching.

A predicted box is a hit when :func:`monai.apps.detection.metrics.matching.matching_batch` matches
it to a reference box of its class: greedily by score, one prediction per reference, IoU at least
:data:`MATCH_IOU` (0.1, as nnDetection and MONAI's LUNA16 tutorial score small lesions, whose boxes
a voxel's error moves a lot). Every other prediction is a false positive, a second hit on the same
lesion included. Sensitivity at ``k`` FP per scan is read off the FROC curve by linear interpolation
(MONAI's :func:`~monai.metrics.froc.compute_froc_score`, which LUNA16's evaluation also uses);
the curve is built here from every threshold, because MONAI's ``compute_froc_curve_data`` never
counts the lowest-scored detection (a CAMELYON16 quirk).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics.froc import compute_froc_score

from medseg.tasks.detection.boxes import Boxes

#: False positives per scan at which sensitivity is reported (LUNA16 reports 1/8 .. 8; these three).
FP_RATES = (1, 2, 4)
#: IoU at which a prediction hits a reference box, for FROC.
MATCH_IOU = 0.1
#: IoU thresholds of the reported average precisions.
AP_IOUS = (0.1, 0.5)
#: Predictions per scan that are scored (COCO's 100).
MAX_DETECTIONS = 100


def _iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    return np.asarray(box_iou(boxes1, boxes2))


def _matches(predictions: Sequence[Boxes], references: Sequence[Boxes],
             thresholds: Sequence[float]) -> list[dict[int, dict[str, np.ndarray]]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} prediction(s) for {len(references)} reference(s): one each per scan")
    return matching_batch(
        iou_fn=_iou, iou_thresholds=thresholds, max_detections=MAX_DETECTIONS,
        pred_boxes=[p.corners for p in predictions], pred_classes=[p.classes for p in predictions],
        pred_scores=[p.scores if p.scores is not None else np.ones(len(p)) for p in predictions],
        gt_boxes=[r.corners for r in references], gt_classes=[r.classes for r in references])


def froc_curve(predictions: Sequence[Boxes], references: Sequence[Boxes]) -> tuple[np.ndarray, np.ndarray]:
    """False positives per scan and sensitivity at every score threshold, most confident first.

    Args:
        predictions: each scan's predicted boxes (with scores).
        references: each scan's reference boxes, in the same grid.

    Returns:
        ``(fps_per_scan, sensitivity)``, both non-decreasing, starting at (0, 0); sensitivity is NaN
        where there is no reference box at all.
    """
    scores, hits = [], []
    for result in _matches(predictions, references, [MATCH_IOU]):
        for per_class in result.values():
            ignored = per_class["dtIgnore"][0].astype(bool)
            scores.append(per_class["dtScores"][~ignored])
            hits.append(per_class["dtMatches"][0][~ignored].astype(bool))
    n_targets = sum(len(r) for r in references)
    all_scores, all_hits = (np.concatenate(scores), np.concatenate(hits)) if scores else (np.zeros(0), np.zeros(0, bool))
    order = np.argsort(-all_scores, kind="stable")
    all_scores, all_hits = all_scores[order], all_hits[order]
    # one operating point per distinct score: tied detections come in together
    last_of_tie = np.r_[all_scores[1:] != all_scores[:-1], True] if len(all_scores) else np.zeros(0, bool)
    tps, fps = np.cumsum(all_hits)[last_of_tie], np.cumsum(~all_hits)[last_of_tie]
    sensitivity = tps / n_targets if n_targets else np.full(len(tps), np.nan)
    return np.r_[0.0, fps / max(len(references), 1)], np.r_[0.0 if n_targets else np.nan, sensitivity]


def sensitivity_at(fps_per_scan: np.ndarray, sensitivity: np.ndarray, rate: float) -> float:
    """Sensitivity at ``rate`` false positives per scan (linear interpolation of the FROC curve; the
    curve's end where it never reaches that many false positives)."""
    return float(compute_froc_score(fps_per_scan[::-1], sensitivity[::-1], (rate,)))


def average_precisions(predictions: Sequence[Boxes], references: Sequence[Boxes],
                       class_values: Sequence[int]) -> dict[float, float]:
    """COCO average precision (101-point, MONAI's :class:`COCOMetric`) at each of :data:`AP_IOUS`,
    averaged over ``class_values``; NaN when no scan has a reference box."""
    if not any(len(r) for r in references):
        return {iou: float("nan") for iou in AP_IOUS}
    index = {value: i for i, value in enumerate(class_values)}

    def reindexed(boxes: Boxes) -> Boxes:  # COCOMetric wants class indices 0..C-1
        return Boxes(boxes.corners, np.array([index[int(c)] for c in boxes.classes], dtype=np.int64), boxes.scores)

    metric = COCOMetric(classes=[str(v) for v in class_values], iou_list=AP_IOUS,
                        iou_range=(AP_IOUS[0], AP_IOUS[-1], AP_IOUS[-1] - AP_IOUS[0]),
                        max_detection=[MAX_DETECTIONS], per_class=False, verbose=False)
    values, _ = metric(_matches([reindexed(p) for p in predictions], [reindexed(r) for r in references],
                                list(metric.iou_thresholds)))
    return {iou: _nan_if_missing(values[f"AP_IoU_{iou:.2f}_MaxDet_{MAX_DETECTIONS}"]) for iou in AP_IOUS}


def _nan_if_missing(value: float) -> float:
    return float("nan") if value < 0 else float(value)  # COCOMetric gives -1 without references


def detection_scores(predictions: Sequence[Boxes], references: Sequence[Boxes], class_values: Sequence[int],
                     prefix: str) -> dict[str, float]:
    """Every detection metric of a split, named ``<prefix>/...``.

    Returns:
        ``sensitivity_at_<k>fp`` for each of :data:`FP_RATES`, ``froc`` (their mean), ``map_iou0.1``
        and ``map_iou0.5``, and ``reference_boxes`` / ``predicted_boxes_per_scan`` for context.
    """
    fps, sensitivity = froc_curve(predictions, references)
    at = {rate: sensitivity_at(fps, sensitivity, rate) for rate in FP_RATES}
    precisions = average_precisions(predictions, references, class_values)
    scans = max(len(references), 1)
    return {
        **{f"{prefix}/sensitivity_at_{rate}fp": value for rate, value in at.items()},
        f"{prefix}/froc": float(np.mean(list(at.values()))),
        **{f"{prefix}/map_iou{iou:g}": value for iou, value in precisions.items()},
        f"{prefix}/reference_boxes": float(sum(len(r) for r in references)),
        f"{prefix}/predicted_boxes_per_scan": float(sum(len(p) for p in predictions) / scans),
    }
