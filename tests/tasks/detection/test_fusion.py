"""Box fusion against known answers: weighted boxes fusion (overlapping boxes become their
score-weighted mean, disjoint ones stay apart, classes never mix), NMS over pooled predictions,
boxes found on a flipped image put back, and fusing on the grid the same as fusing in world mm."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.tasks.detection.boxes import Boxes, voxel_to_world
from medseg.tasks.detection.config import BoxFusion
from medseg.tasks.detection.fusion import (
    fuse_boxes,
    iou_with,
    nms_fusion,
    unflip_boxes,
    weighted_boxes_fusion,
)


def _boxes(corners: list[list[float]], scores: list[float], classes: list[int] | None = None) -> Boxes:
    return Boxes(np.array(corners, dtype=np.float64), np.array(classes or [1] * len(corners), dtype=np.int64),
                 np.array(scores, dtype=np.float64))


def test_two_overlapping_3d_boxes_fuse_to_their_score_weighted_mean() -> None:
    a = _boxes([[10, 20, 4, 20, 30, 8]], [0.9])
    b = _boxes([[12, 21, 4, 22, 31, 9]], [0.3])  # IoU 288 / 612 = 0.47 with a
    assert iou_with(a.corners[0], b.corners)[0] == pytest.approx(8 * 9 * 4 / (400 + 500 - 288))
    fused = weighted_boxes_fusion([a, b], iou=0.4)
    assert len(fused) == 1 and fused.classes.tolist() == [1]
    expected = (0.9 * a.corners[0] + 0.3 * b.corners[0]) / 1.2  # [10.5, 20.25, 4, 20.5, 30.25, 8.25]
    np.testing.assert_allclose(fused.corners[0], expected)
    np.testing.assert_allclose(fused.corners[0], [10.5, 20.25, 4.0, 20.5, 30.25, 8.25])
    assert fused.scores is not None and fused.scores[0] == pytest.approx(0.6)  # mean score, both predictions found it


def test_disjoint_boxes_stay_apart_and_lose_the_share_of_predictions_that_missed_them() -> None:
    a = _boxes([[0, 0, 10, 10]], [0.8])
    b = _boxes([[30, 30, 36, 40]], [0.6])
    fused = weighted_boxes_fusion([a, b], iou=0.55)
    np.testing.assert_allclose(fused.corners, [[0, 0, 10, 10], [30, 30, 36, 40]])
    np.testing.assert_allclose(np.asarray(fused.scores), [0.4, 0.3])  # each seen by one of two predictions


def test_classes_never_fuse_and_a_third_box_joins_the_fused_one() -> None:
    a = _boxes([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.5], [1, 2])
    b = _boxes([[1, 0, 11, 10]], [0.6], [1])
    c = _boxes([[0, 1, 10, 11]], [0.3], [1])
    fused = weighted_boxes_fusion([a, b, c], iou=0.5)
    assert fused.classes.tolist() == [1, 2]
    np.testing.assert_allclose(fused.corners[0], [(0.6 * 1) / 1.8, 0.3 / 1.8, 10 + 0.6 / 1.8, 10 + 0.3 / 1.8])
    np.testing.assert_allclose(np.asarray(fused.scores), [0.6, 0.5 / 3])


def test_nms_keeps_the_best_of_each_group_and_limit_and_one_prediction() -> None:
    a = _boxes([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.2])
    b = _boxes([[1, 1, 11, 11]], [0.95])
    kept = nms_fusion([a, b], iou=0.3)
    np.testing.assert_allclose(kept.corners, [[1, 1, 11, 11], [50, 50, 60, 60]])
    assert len(fuse_boxes([a, b], BoxFusion.NMS, 0.3, limit=1)) == 1
    single = fuse_boxes([a], BoxFusion.WBF, 0.55)
    np.testing.assert_allclose(np.asarray(single.scores), [0.9, 0.2])  # one prediction: its boxes as they are
    assert len(weighted_boxes_fusion([Boxes.empty(3), Boxes.empty(3)], 0.55)) == 0


def test_boxes_found_on_a_flipped_image_come_back() -> None:
    found = _boxes([[2, 5, 1, 6, 9, 3]], [0.7])  # on the image flipped along axes 0 and 2 of (20, 16, 7)
    back = unflip_boxes(found, (0, 2), (20, 16, 7))
    np.testing.assert_allclose(back.corners, [[14, 5, 4, 18, 9, 6]])
    np.testing.assert_allclose(unflip_boxes(back, (0, 2), (20, 16, 7)).corners, found.corners)


def test_fusing_on_an_anisotropic_grid_is_fusing_in_world_mm() -> None:
    affine = np.array([[0.7, 0, 0, -40.0], [0, -1.3, 0, 12.5], [0, 0, 4.1, -80.0], [0, 0, 0, 1]])
    a = _boxes([[10, 20, 4, 20, 30, 8], [40, 5, 1, 44, 9, 3]], [0.9, 0.5])
    b = _boxes([[12, 21, 4, 22, 31, 9]], [0.3])
    on_grid = weighted_boxes_fusion([a, b], iou=0.4)
    in_world = weighted_boxes_fusion([Boxes(voxel_to_world(p.corners, affine), p.classes, p.scores) for p in (a, b)],
                                     iou=0.4)
    np.testing.assert_allclose(voxel_to_world(on_grid.corners, affine), in_world.corners, atol=1e-9)
    np.testing.assert_allclose(np.asarray(on_grid.scores), np.asarray(in_world.scores))
