"""Each planning rule on its own: anisotropy, pooling and kernels, normalisation, rare classes,
nnU-Net's default plan, and the budget fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.planning import rules
from medseg.planning.probe import pick_within_budget


def test_isotropic_data_take_the_median_spacing() -> None:
    spacings = [[1.0, 1.0, 1.0], [1.2, 1.0, 0.9], [0.8, 1.0, 1.1]]
    decision = rules.target_spacing(spacings, [[40, 50, 40]] * 3)
    assert decision.spacing == pytest.approx([1.0, 1.0, 1.0]) and decision.anisotropic_axis is None


def test_a_thick_slice_axis_takes_its_10th_percentile_spacing() -> None:
    # 0.7 x 0.7 x 5 mm with a few 3 mm scans: z is > 3x coarser and has < 1/3 of the voxels
    spacings = [[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 3.0]] * 2
    decision = rules.target_spacing(spacings, [[512, 512, 30]] * 10)
    assert decision.anisotropic_axis == 2
    assert decision.spacing[:2] == pytest.approx([0.7, 0.7])
    assert decision.spacing[2] == pytest.approx(np.percentile([5.0] * 8 + [3.0] * 2, 10))
    assert "anisotropic" in decision.reason


def test_coarse_but_long_axes_are_not_anisotropic() -> None:
    # z is 4x coarser but has as many voxels as the others: the median stays (nnU-Net's second condition)
    decision = rules.target_spacing([[1.0, 1.0, 4.0]] * 3, [[100, 100, 100]] * 3)
    assert decision.anisotropic_axis is None and decision.spacing == pytest.approx([1.0, 1.0, 4.0])


def test_pooling_stops_at_8_voxels_and_pools_isotropic_axes_together() -> None:
    topology = rules.pool_and_conv([1.0, 1.0, 1.0], [40, 56, 40])
    assert topology.pools_per_axis == [3, 3, 3]
    assert topology.strides == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert topology.kernels == [[3, 3, 3]] * 4
    assert topology.patch == [40, 56, 40]


def test_thick_slices_get_an_in_plane_first_topology() -> None:
    topology = rules.pool_and_conv([0.7, 0.7, 5.0], [128, 128, 24])
    # z is not pooled (nor convolved across) until in-plane pooling has brought x, y within 2x of it
    assert topology.strides[1] == [2, 2, 1] and topology.strides[2] == [2, 2, 1]
    assert topology.kernels[0] == [3, 3, 1] and topology.kernels[1] == [3, 3, 1]
    assert topology.kernels[-1] == [3, 3, 3]
    assert topology.pools_per_axis[2] < topology.pools_per_axis[0]
    assert all(p % d == 0 for p, d in zip(topology.patch, topology.divisor))


def test_the_patch_is_padded_to_what_the_pooling_divides() -> None:
    topology = rules.pool_and_conv([1.0, 1.0], [37, 50])
    assert all(p % d == 0 and p >= q for p, d, q in zip(topology.patch, topology.divisor, [37, 50]))


def test_the_initial_patch_is_proportional_to_1_over_spacing_and_clipped_to_the_median_shape() -> None:
    assert rules.initial_patch([1.0, 1.0, 1.0], [36, 50, 35]) == [36, 50, 35]
    patch = rules.initial_patch([0.5, 0.5, 2.0], [600, 600, 600])
    assert patch[0] == patch[1] == pytest.approx(4 * patch[2], abs=2)


def test_ct_is_clipped_and_z_scored_with_dataset_statistics() -> None:
    decision = rules.normalisation("CT", -958.0, 327.0, 82.9, 136.2, median_crop_ratio=0.9)
    assert decision.intensity == {"mode": "clip_zscore", "clip": [-958.0, 327.0], "mean": 82.9, "std": 136.2}


@pytest.mark.parametrize(("crop_ratio", "masked"), [(0.5, True), (0.74, True), (0.8, False), (1.0, False)])
def test_other_modalities_are_z_scored_inside_the_nonzero_mask_when_cropping_removes_a_quarter(
        crop_ratio: float, masked: bool) -> None:
    decision = rules.normalisation("T2", 0.0, 900.0, 300.0, 100.0, median_crop_ratio=crop_ratio)
    assert decision.intensity == {"mode": "zscore", "nonzero": masked} and decision.crop_foreground is masked


def test_rare_classes_are_rare_in_voxels_or_in_cases() -> None:
    fractions = {0: 0.95, 1: 0.03, 2: 0.02, 3: 0.0001}
    assert rules.rare_classes(fractions, {1: 1.0, 2: 1.0, 3: 1.0}) == [3]
    assert rules.rare_classes({0: 0.9, 1: 0.05, 2: 0.05}, {1: 1.0, 2: 0.5}) == [2]
    assert rules.rare_classes({0: 0.9, 1: 0.05, 2: 0.05}, {1: 1.0, 2: 1.0}) == []


def test_nnunet_default_plan_for_a_hippocampus_like_dataset() -> None:
    rng = np.random.default_rng(0)
    shapes = [[35 + rng.integers(-3, 4), 50 + rng.integers(-3, 4), 36 + rng.integers(-3, 4)] for _ in range(100)]
    plan = rules.nnunet_default_plan([[1.0, 1.0, 1.0]] * 100, shapes, in_channels=1, classes=3)
    # nnU-Net v2's published plan for Task04: patch [40, 56, 40], 3 poolings per axis, batch 9
    assert plan.patch == [40, 56, 40] and plan.pools_per_axis == [3, 3, 3]
    assert plan.features == [32, 64, 128, 256]
    assert 2 <= plan.batch_size <= 12


def test_nnunet_shrinks_a_patch_that_does_not_fit_its_gpu_reference() -> None:
    plan = rules.nnunet_default_plan([[0.8, 0.8, 0.8]] * 4, [[400, 400, 400]] * 4, in_channels=1, classes=2)
    assert np.prod(plan.patch) < 256**3 and plan.batch_size == 2
    assert plan.features[-1] == 320


def test_budget_fit_takes_the_richest_candidate_that_reaches_the_goal() -> None:
    # richest first: 0.5 s, 0.1 s, 0.02 s per step; 1000 s of steps; goal 20,000 steps
    pick = pick_within_budget([0.5, 0.1, 0.02], budget_seconds=1000, min_steps=20_000)
    assert (pick.index, pick.steps, pick.reaches_goal) == (2, 50_000, True)
    pick = pick_within_budget([0.5, 0.1, 0.02], budget_seconds=1000, min_steps=2000)
    assert (pick.index, pick.reaches_goal) == (0, True)


def test_budget_fit_falls_back_to_the_most_steps_and_skips_unmeasured_candidates() -> None:
    pick = pick_within_budget([None, 0.4, 0.2], budget_seconds=100, min_steps=10_000)
    assert (pick.index, pick.steps, pick.reaches_goal) == (2, 500, False)
    assert pick_within_budget([None, None], 100, 1) is None


def test_clip_zscore_clips_then_standardises() -> None:
    from medseg.config import IntensityConfig
    from medseg.data.transforms import intensity_transform

    cfg = IntensityConfig(mode="clip_zscore", clip=(-100.0, 300.0), mean=50.0, std=25.0)
    out = intensity_transform(cfg)({"image": torch.tensor([[-1000.0, 50.0, 75.0, 2000.0]])})["image"]
    assert out.tolist()[0] == pytest.approx([-6.0, 0.0, 1.0, 10.0])


def test_clip_zscore_needs_its_statistics() -> None:
    from pydantic import ValidationError

    from medseg.config import IntensityConfig

    with pytest.raises(ValidationError, match="clip, mean and std are required with mode: clip_zscore"):
        IntensityConfig(mode="clip_zscore", clip=(-100.0, 300.0))


def test_per_axis_strides_and_kernels_build_an_in_plane_first_dynunet() -> None:
    from medseg.config import UNetModelConfig
    from medseg.errors import ModelError
    from medseg.tasks.segmentation.networks import create_segmentation_network

    topology = rules.pool_and_conv([0.7, 0.7, 5.0], [64, 64, 12])
    strides = [s[0] if len(set(s)) == 1 else s for s in topology.strides[1:]]
    cfg = UNetModelConfig(name="dynunet", channels=tuple(8 * 2**i for i in range(topology.stages)),
                          strides=tuple(strides), kernels=tuple(tuple(k) for k in topology.kernels))
    network = create_segmentation_network(cfg, 1, 4, topology.patch)
    assert network(torch.zeros(1, 1, *topology.patch)).shape == (1, 4, *topology.patch)
    with pytest.raises(ModelError, match=r"must be divisible by \[\d+, \d+, \d+\]"):
        create_segmentation_network(cfg, 1, 4, [topology.patch[0] + 1, *topology.patch[1:]])


def test_reduced_precisions_are_bf16_on_a_cpu() -> None:
    from medseg.config import Precision
    from medseg.planning.probe import reduced_precisions

    assert reduced_precisions(torch.device("cpu")) == [Precision.BF16]


def test_a_precision_is_kept_only_when_its_loss_curve_matches_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.config import Precision
    from medseg.planning import probe

    curves = {Precision.FP32: [1.0, 0.8, 0.6, 0.5], Precision.BF16: [1.0, 0.81, 0.6, 0.5]}
    monkeypatch.setattr(probe, "_train_steps", lambda task, cfg, batch, device, precision, cl, steps:
                        ([(0.01, loss) for loss in curves[precision]], 1))
    same, gap, _, _ = probe.same_loss_curve(None, None, None, torch.device("cpu"), Precision.BF16, False)
    assert same and gap == pytest.approx(0.0125)
    curves[Precision.BF16] = [1.0, 0.8, 0.7, 0.65]  # learns slower: 30 % above fp32 at the end
    same, gap, _, _ = probe.same_loss_curve(None, None, None, torch.device("cpu"), Precision.BF16, False)
    assert not same and gap == pytest.approx(0.3)
    curves[Precision.BF16] = [1.0, float("nan"), 0.6, 0.5]
    assert not probe.same_loss_curve(None, None, None, torch.device("cpu"), Precision.BF16, False)[0]


def test_the_probe_times_a_real_step_and_records_a_failure_instead_of_raising() -> None:
    from medseg.config import Precision
    from medseg.planning.probe import ProbeClock, time_steps
    from medseg.tasks.registry import get_task

    task = get_task("segmentation")
    cfg = task.config_type.model_validate({
        "data": {"manifest": "m.csv", "labels": {0: "bg", 1: "fg"}}, "patch": {"size": [16, 16, 8]},
        "model": {"name": "unet", "channels": [4, 8], "strides": [[2, 2, 1]]}})
    batch = (torch.randn(2, 1, 16, 16, 8), torch.randint(0, 2, (2, 1, 16, 16, 8)))
    result = time_steps(task, cfg, batch, torch.device("cpu"), Precision.FP32, True, "tiny", ProbeClock())
    assert result.seconds_per_step is not None and result.seconds_per_step > 0 and result.parameters > 0
    wrong = (torch.randn(2, 3, 16, 16, 8), batch[1])  # 3 channels into a 1-channel network
    failed = time_steps(task, cfg, wrong, torch.device("cpu"), Precision.FP32, True, "tiny", ProbeClock())
    assert failed.seconds_per_step is None and failed.note.startswith("failed:")
    late = time_steps(task, cfg, batch, torch.device("cpu"), Precision.FP32, True, "tiny", ProbeClock(0.0))
    assert late.note == "skipped: probe time used up"


def test_a_patch_as_big_as_the_image_is_shrunk_so_crops_still_move() -> None:
    topology = rules.leave_crop_room([1.0, 1.0, 1.0], rules.pool_and_conv([1.0, 1.0, 1.0], [40, 56, 40]),
                                     [35.0, 50.0, 36.0])
    assert topology.patch == [32, 48, 32] and topology.pools_per_axis == [3, 3, 3]
    big = rules.pool_and_conv([1.0, 1.0, 1.0], [64, 64, 64])
    assert rules.leave_crop_room([1.0, 1.0, 1.0], big, [200.0, 200.0, 200.0]).patch == [64, 64, 64]  # room already
    thick = rules.leave_crop_room([0.7, 0.7, 5.0], rules.pool_and_conv([0.7, 0.7, 5.0], [128, 128, 24]),
                                  [130.0, 126.0, 24.0])
    assert all(p < m for p, m in zip(thick.patch, [130, 126, 24]))
    assert all(p % d == 0 for p, d in zip(thick.patch, thick.divisor))


@pytest.mark.parametrize(("dims", "n_train", "names", "flip", "noise"), [
    (2, 546, ["ultrasound"], True, True),    # no handedness, small: flips and stronger augmentation
    (2, 4708, ["xray"], False, False),       # a chest X-ray has a left and a right
    (2, 500, ["image"], False, True),        # unknown modality: no flips
    (3, 1188, ["mask"], True, False),        # 3D shape data: flips on every axis
])
def test_classification_augmentation_follows_modality_and_dataset_size(dims: int, n_train: int, names: list[str],
                                                                       flip: bool, noise: bool) -> None:
    from medseg.tasks.classification.planner import _augmentation

    items = {a["name"]: a for a in _augmentation(dims, n_train, names)}
    assert ("flip" in items) is flip and ("noise" in items) is noise
    if flip and dims == 2:
        assert items["flip"]["axes"] == [0]
