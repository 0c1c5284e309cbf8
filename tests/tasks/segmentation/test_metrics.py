"""Dice from summed tp/fp/fn, background excluded, NaN for empty; HD95 in mm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.tasks.segmentation.metrics import SegmentationMetrics, dice_from_counts

LABELS = {0: "background", 1: "a", 2: "b"}


def test_dice_is_computed_from_counts_summed_over_cases() -> None:
    metrics = SegmentationMetrics(LABELS, hd95=False)
    ref1 = torch.zeros(4, 4, 4, dtype=torch.uint8)
    ref1[:2] = 1  # 32 voxels of class 1
    pred1 = torch.zeros_like(ref1)
    pred1[:1] = 1  # 16 tp, 16 fn
    ref2 = torch.zeros_like(ref1)
    ref2[:1] = 1  # 16 voxels
    pred2 = ref2.clone()
    pred2[3] = 1  # 16 tp, 16 fp
    metrics.update(pred1, ref1, case_id="c1")
    metrics.update(pred2, ref2, case_id="c2")
    out = metrics.aggregate("val")
    tp, fp, fn = 32, 16, 16
    assert math.isclose(out["val/dice/a"], 2 * tp / (2 * tp + fp + fn))
    # class b is absent everywhere: NaN, and it does not drag the mean down
    assert math.isnan(out["val/dice/b"])
    assert math.isclose(out["val/dice_mean"], out["val/dice/a"])
    assert "val/dice/background" not in out
    # the per-case mean differs from the summed one: both cases have Dice 2/3 here by construction
    assert metrics.per_case[0]["case_id"] == "c1"
    assert math.isclose(float(metrics.per_case[0]["dice/a"]), 2 * 16 / (2 * 16 + 16))


def test_perfect_prediction_scores_one_and_hd95_zero() -> None:
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.integers(0, 3, size=(9, 11, 7)).astype(np.uint8))
    metrics = SegmentationMetrics(LABELS, hd95=True)
    metrics.update(ref.clone(), ref, spacing=(1.0, 1.0, 2.5))
    out = metrics.aggregate("val")
    assert out["val/dice/a"] == 1.0 and out["val/dice/b"] == 1.0
    assert out["val/hd95/a"] == 0.0


def test_hd95_uses_voxel_spacing() -> None:
    ref = torch.zeros(20, 20, 20, dtype=torch.uint8)
    ref[5:10, 5:10, 5:10] = 1
    pred = torch.zeros_like(ref)
    pred[5:10, 5:10, 7:12] = 1  # shifted two voxels along z
    iso = SegmentationMetrics({0: "bg", 1: "a"})
    iso.update(pred, ref, spacing=(1.0, 1.0, 1.0))
    aniso = SegmentationMetrics({0: "bg", 1: "a"})
    aniso.update(pred, ref, spacing=(1.0, 1.0, 3.0))
    assert math.isclose(iso.aggregate()["val/hd95/a"], 2.0, abs_tol=1e-6)
    assert math.isclose(aniso.aggregate()["val/hd95/a"], 6.0, abs_tol=1e-6)


def test_dice_from_counts_handles_empty_classes() -> None:
    counts = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 5.0]], dtype=torch.float64)
    dice = dice_from_counts(counts)
    assert math.isnan(float(dice[0]))
    assert math.isclose(float(dice[1]), 10 / 15)


def test_shape_mismatch_is_an_error() -> None:
    metrics = SegmentationMetrics(LABELS, hd95=False)
    with pytest.raises(ValueError, match="differs from reference"):
        metrics.update(torch.zeros(3, 3, 3), torch.zeros(3, 3, 4))


def test_a_missed_structure_counts_as_the_worst_distance_not_as_nothing() -> None:
    ref = torch.zeros(10, 20, 30, dtype=torch.uint8)
    ref[2:5, 2:5, 2:5] = 1
    metrics = SegmentationMetrics({0: "bg", 1: "a"})
    metrics.update(torch.zeros_like(ref), ref, spacing=(1.0, 2.0, 0.5))
    diagonal = float(np.linalg.norm([10 * 1.0, 20 * 2.0, 30 * 0.5]))
    assert metrics.aggregate()["val/hd95/a"] == pytest.approx(diagonal)
