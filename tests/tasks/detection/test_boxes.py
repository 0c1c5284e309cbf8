"""Boxes from label maps and their conversions between voxel indices and world millimetres,
against answers worked out by hand on anisotropic, flipped, permuted and oblique grids."""

from __future__ import annotations

import numpy as np
import pytest
from monai.apps.detection.transforms.box_ops import convert_mask_to_box

from medseg.errors import ImageValueError, ManifestError
from medseg.tasks.detection.boxes import boxes_from_label, check_boxes, voxel_to_world, world_to_voxel
from tests.conftest import oblique_affine


def _affine(spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:-1, -1] = origin
    return affine


def test_voxel_box_to_world_by_hand_on_an_anisotropic_grid() -> None:
    # voxels 2..4, 3..3, 1..6 (ends exclusive 5, 4, 7); spacing (0.5, 2, 3), origin (10, -4, 100):
    # x from 10 + 0.5 * 1.5 = 10.75 to 10 + 0.5 * 4.5 = 12.25; y -4 + 2 * 2.5 = 1 .. -4 + 2 * 3.5 = 3;
    # z 100 + 3 * 0.5 = 101.5 .. 100 + 3 * 6.5 = 119.5
    world = voxel_to_world(np.array([[2, 3, 1, 5, 4, 7]]), _affine((0.5, 2.0, 3.0), (10.0, -4.0, 100.0)))
    np.testing.assert_allclose(world, [[10.75, 1.0, 101.5, 12.25, 3.0, 119.5]])


def test_flipped_and_permuted_axes_give_minimum_then_maximum() -> None:
    # x runs backwards (spacing -0.8, as RAS from an LPS scan), array axis 1 is world z, axis 2 world y
    affine = np.array([[-0.8, 0, 0, 50.0], [0, 0, 1.5, 0.0], [0, 2.5, 0, -20.0], [0, 0, 0, 1]])
    world = voxel_to_world(np.array([[0, 2, 4, 10, 6, 5]]), affine)
    # x: 50 - 0.8 * -0.5 = 50.4 and 50 - 0.8 * 9.5 = 42.4; y (axis 2): 1.5 * 3.5 = 5.25 .. 1.5 * 4.5 = 6.75;
    # z (axis 1): -20 + 2.5 * 1.5 = -16.25 .. -20 + 2.5 * 5.5 = -6.25
    np.testing.assert_allclose(world, [[42.4, 5.25, -16.25, 50.4, 6.75, -6.25]])
    np.testing.assert_allclose(world_to_voxel(world, affine), [[0, 2, 4, 10, 6, 5]])


def test_round_trip_is_exact_on_axis_aligned_grids_and_encloses_on_oblique_ones() -> None:
    rng = np.random.default_rng(3)
    starts = rng.integers(0, 20, (7, 3)).astype(float)
    boxes = np.concatenate([starts, starts + rng.integers(1, 9, (7, 3))], axis=1)
    aligned = _affine((0.7, 0.9, 5.0), (-100.0, 12.0, 40.0))
    np.testing.assert_allclose(world_to_voxel(voxel_to_world(boxes, aligned), aligned), boxes, atol=1e-9)
    oblique = oblique_affine((0.7, 0.9, 5.0), (-100.0, 12.0, 40.0), 17.0)
    back = world_to_voxel(voxel_to_world(boxes, oblique), oblique)
    assert (back[:, :3] <= boxes[:, :3] + 1e-9).all() and (back[:, 3:] >= boxes[:, 3:] - 1e-9).all()
    assert (back[:, 3:] - back[:, :3] > boxes[:, 3:] - boxes[:, :3] + 0.1).any()  # the rotation grew them


def test_2d_boxes_take_the_first_two_axes_of_a_4x4_affine() -> None:
    world = voxel_to_world(np.array([[1, 2, 4, 3]]), _affine((0.25, 0.5, 9.0), (1.0, 2.0, 3.0)))
    np.testing.assert_allclose(world, [[1.125, 2.75, 1.875, 3.25]])


def test_components_per_class_with_a_minimum_size_agree_with_monai() -> None:
    label = np.zeros((13, 11, 7), dtype=np.uint8)
    label[2:5, 3:4, 1:6] = 1  # 15 voxels
    label[8:12, 6:10, 2:4] = 1  # 32 voxels, not touching the first
    label[0, 0, 0] = 1  # one voxel: below the minimum
    label[6:8, 0:2, 5:7] = 2  # 8 voxels of class 2
    boxes = boxes_from_label(label, spacing_volume=0.5 * 1.0 * 2.0, min_volume_mm3=4.0)
    np.testing.assert_array_equal(boxes.corners, [[2, 3, 1, 5, 4, 6], [8, 6, 2, 12, 10, 4], [6, 0, 5, 8, 2, 7]])
    np.testing.assert_array_equal(boxes.classes, [1, 1, 2])
    # MONAI's own box of one class mask (every component together) uses the same end-exclusive corners
    monai_box, _ = convert_mask_to_box((label == 2)[None].astype(np.int16), bg_label=0)
    np.testing.assert_array_equal(monai_box, boxes.corners[2:])


def test_an_empty_label_is_a_negative_case_but_only_tiny_components_is_an_error() -> None:
    assert len(boxes_from_label(np.zeros((5, 6, 7)), 1.0)) == 0
    label = np.zeros((9, 9, 9))
    label[1, 1, 1] = label[5, 5, 5] = 1
    with pytest.raises(ImageValueError, match=r"(?s)case_004.nii.gz.*Expected at least one component.*Got 2 comp"):
        boxes_from_label(label, 1.0, min_volume_mm3=3.0, source="case_004.nii.gz")
    with pytest.raises(ImageValueError, match="Expected a label map of integer"):
        boxes_from_label(label * 0.5, 1.0, source="soft.nii.gz")


@pytest.mark.parametrize(("box", "message"), [
    ([2, 2, 2, 2, 5, 5], r"Expected a box with positive size.*start 2 and end 2 on axis 0"),
    ([4, 2, 2, 3, 5, 5], r"Expected a box with positive size.*start 4 and end 3 on axis 0 \(a degenerate box\)"),
    ([2, np.nan, 2, 3, 5, 5], r"Expected finite coordinates"),
    ([30, 2, 2, 34, 5, 5], r"Expected a box inside the image \(0..\[10, 8, 6\] voxels\)\. Got voxels \[30"),
    ([-5, 2, 2, -1, 5, 5], r"Expected a box inside the image"),
])
def test_bad_boxes_name_the_file_the_box_and_the_rule(box: list[float], message: str) -> None:
    with pytest.raises(ManifestError, match=f"(?s)boxes.csv \\(case_001\\): box 0: {message}"):
        check_boxes(np.array([box]), (10, 8, 6), "boxes.csv (case_001)")


def test_boxes_a_fraction_of_a_voxel_outside_are_clipped() -> None:
    clipped = check_boxes(np.array([[-0.4, 0, 0, 10.3, 8, 6]]), (10, 8, 6), "x")
    np.testing.assert_allclose(clipped, [[0, 0, 0, 10, 8, 6]])
