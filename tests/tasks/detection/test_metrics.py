"""FROC and average precision against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.tasks.detection.boxes import Boxes
from medseg.tasks.detection.metrics import detection_scores, froc_curve


def _boxes(rows: list[list[float]], scores: list[float] | None = None, classes: list[int] | None = None) -> Boxes:
    corners = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return Boxes(corners, np.array(classes or [1] * len(corners), dtype=np.int64),
                 None if scores is None else np.array(scores, dtype=np.float64))


#: Two scans, three lesions. By score: 0.9 hit (A), 0.8 miss, 0.7 miss, 0.6 hit (B, IoU 0.75), 0.5 miss,
#: 0.3 hit at IoU 0.1 only (C, IoU 18/64).
REFERENCES = [_boxes([[0, 0, 0, 4, 4, 4], [10, 10, 10, 14, 14, 14]]), _boxes([[2, 2, 2, 6, 6, 6]])]
PREDICTIONS = [
    _boxes([[0, 0, 0, 4, 4, 4], [20, 0, 0, 23, 3, 3], [10, 10, 10, 14, 14, 13]], [0.9, 0.8, 0.6]),
    _boxes([[20, 20, 20, 22, 22, 22], [9, 0, 0, 12, 3, 3], [3, 3, 3, 6, 6, 5]], [0.7, 0.5, 0.3]),
]


def test_froc_curve_by_hand() -> None:
    fps, sensitivity = froc_curve(PREDICTIONS, REFERENCES)
    np.testing.assert_allclose(fps, [0, 0, 0.5, 1, 1, 1.5, 1.5])
    np.testing.assert_allclose(sensitivity, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])


def test_sensitivities_froc_and_average_precision_by_hand() -> None:
    scores = detection_scores(PREDICTIONS, REFERENCES, [1], "test")
    # at 1 FP/scan the curve reaches 2/3 (the hit at 0.6 comes with no new false positive); 1.5 FP/scan finds all
    assert scores["test/sensitivity_at_1fp"] == pytest.approx(2 / 3)
    assert scores["test/sensitivity_at_2fp"] == pytest.approx(1.0)
    assert scores["test/sensitivity_at_4fp"] == pytest.approx(1.0)
    assert scores["test/froc"] == pytest.approx(8 / 9)
    # COCO's 101 recall points: precision 1 up to recall 0.33 (34 points), then 0.5 (67 points at IoU 0.1;
    # at IoU 0.5 the third hit is missed, so 33 points reach recall 2/3 and the rest score 0)
    assert scores["test/map_iou0.1"] == pytest.approx(67.5 / 101)
    assert scores["test/map_iou0.5"] == pytest.approx(50.5 / 101)
    assert scores["test/reference_boxes"] == 3
    assert scores["test/predicted_boxes_per_scan"] == 3


def test_a_second_hit_on_one_lesion_and_a_hit_of_another_class_are_false_positives() -> None:
    references = [_boxes([[0, 0, 0, 4, 4, 4]])]
    predictions = [_boxes([[0, 0, 0, 4, 4, 4], [0, 0, 0, 4, 4, 3], [0, 0, 0, 4, 4, 4]], [0.9, 0.8, 0.7], [1, 1, 2])]
    fps, sensitivity = froc_curve(predictions, references)
    np.testing.assert_allclose(fps, [0, 0, 1, 2])
    np.testing.assert_allclose(sensitivity, [0, 1, 1, 1])


def test_no_predictions_score_zero_and_no_references_score_nan() -> None:
    empty = [Boxes(np.zeros((0, 6)), np.zeros(0, np.int64), np.zeros(0))] * 2
    scores = detection_scores(empty, REFERENCES, [1], "val")
    assert scores["val/froc"] == 0 and scores["val/map_iou0.1"] == 0
    nothing = detection_scores(PREDICTIONS, [Boxes.empty(3)] * 2, [1], "val")
    assert math.isnan(nothing["val/froc"]) and math.isnan(nothing["val/map_iou0.1"])


def test_tied_scores_enter_the_curve_together() -> None:
    references = [_boxes([[0, 0, 0, 4, 4, 4]])]
    predictions = [_boxes([[0, 0, 0, 4, 4, 4], [9, 9, 9, 10, 10, 10]], [0.5, 0.5])]
    fps, sensitivity = froc_curve(predictions, references)
    np.testing.assert_allclose(fps, [0, 1])
    np.testing.assert_allclose(sensitivity, [0, 1])
