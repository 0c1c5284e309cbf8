"""The plan's choice of how val and test are scored: mirrored (nnU-Net) when it fits the budget."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.planning.fingerprint import CaseFingerprint, Fingerprint
from medseg.tasks.segmentation.scoring_plan import (
    MIRRORED_SCORING_SHARE,
    decide,
    scored_shapes,
    windows_per_case,
)


def _case(case_id: str, split: str, shape: list[int], spacing: list[float]) -> CaseFingerprint:
    return CaseFingerprint(case_id=case_id, split=split, shape=shape, spacing=spacing, orientation="RAS", channels=1,
                           cropped_shape=shape, crop_ratio=1.0)


def _fingerprint(cases: list[CaseFingerprint]) -> Fingerprint:
    return Fingerprint(manifest="m.csv", manifest_sha256="0", root=".", task_kind="segmentation", spatial_dims=3,
                       channel_names=["MRI"], cases=cases, channels=[], classes=[], elapsed_s=0.0)


@pytest.mark.parametrize(("shape", "patch", "overlap"), [((37, 50, 29), (16, 24, 16), 0.5), ((13, 9, 40), (16, 16, 16), 0.5),
                                                         ((33, 33, 33), (32, 32, 8), 0.25), ((5, 64, 7), (8, 20, 8), 0.6)])
def test_windows_per_case_counts_the_windows_monai_runs(shape, patch, overlap) -> None:
    calls = []

    def network(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x

    sliding_window_inference(torch.zeros(1, 1, *shape), patch, 1, network, overlap=overlap, mode="constant")
    assert windows_per_case(shape, patch, overlap) == sum(calls)


def test_scored_cases_are_val_and_test_at_the_target_spacing_or_a_fold_of_the_rest() -> None:
    split = _fingerprint([_case("a", "train", [10, 10, 10], [1, 1, 1]), _case("b", "val", [10, 20, 10], [2, 1, 1]),
                          _case("c", "test", [8, 8, 8], [1, 1, 3])])
    assert scored_shapes(split, [1.0, 1.0, 1.5]) == [[20.0, 20.0, 20 / 3], [8.0, 8.0, 16.0]]
    folds = _fingerprint([_case(str(i), "train", [10, 10, 10], [1, 1, 1]) for i in range(10)]
                         + [_case("t", "test", [10, 10, 10], [1, 1, 1])])
    assert len(scored_shapes(folds, [1.0, 1.0, 1.0])) == 1 + 2  # the test case and one fold of five


def test_mirroring_is_kept_up_to_its_share_of_the_budget_and_dropped_past_it() -> None:
    # 4 scored cases, each one window (image inside the patch), 8 mirrorings: 32 windows; at batch 2 a
    # window costs a sixth of a step, so a 0.3 s step makes 32 * 0.05 = 1.6 s of mirrored scoring
    fp = _fingerprint([_case(str(i), "val" if i < 2 else "test", [20, 20, 20], [1, 1, 1]) for i in range(4)])
    fits = 1.6 / 60 / MIRRORED_SCORING_SHARE  # minutes of budget whose share is exactly 1.6 s
    kept = decide(fp, [1, 1, 1], [32, 32, 32], 0.5, step_seconds=0.3, batch_size=2, budget_minutes=fits * 1.001)
    dropped = decide(fp, [1, 1, 1], [32, 32, 32], 0.5, step_seconds=0.3, batch_size=2, budget_minutes=fits * 0.999)
    assert kept.tta is None and kept.mirrored_seconds == pytest.approx(1.6)
    assert dropped.tta is False and "predict --tta" in dropped.why and "validation.tta: true" in dropped.why


def test_an_unprobed_plan_scores_as_nnunet_does() -> None:
    fp = _fingerprint([_case("v", "val", [20, 20, 20], [1, 1, 1])])
    decision = decide(fp, [1, 1, 1], [8, 8, 8], 0.5, step_seconds=None, batch_size=2, budget_minutes=0.1)
    assert decision.tta is None and "not probed" in decision.why
