"""Bounded-memory prediction (slab by slab) gives the full-buffer path's masks, bitwise.

Small awkward volumes written to disk: odd shapes, anisotropic voxels, affines that permute and
flip axes, a zero border for the foreground crop, several classes, TTA, an ensemble whose
members have different patches, small-component removal, and a resampling model.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.engine.model_loading import LoadedModel
from medseg.engine.results import PredictOptions
from medseg.tasks.segmentation.bounded import plan_scores
from medseg.tasks.segmentation.predict import SegmentationPredictor
from medseg.tasks.segmentation.training import build_network, model_contract
from tests.conftest import REPO

SMALL = ["model.channels=[4,8,16]", "model.strides=[2,2]", "data.labels={0: background, 1: a, 2: b, 3: c}"]
#: voxel axes -> world: permuted, flipped, anisotropic, shifted
AFFINE = np.array([[0.0, -0.9, 0.0, 10.0], [1.1, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])


def _member(overrides: list[str], seed: int = 0) -> tuple[torch.nn.Module, dict]:
    cfg = medseg.load_config(REPO / "configs" / "msd_hippocampus.yaml", [*SMALL, *overrides])
    torch.manual_seed(seed)
    return build_network(cfg).eval(), model_contract(cfg)


def _model(*members: tuple[torch.nn.Module, dict], **contract_extra: object) -> LoadedModel:
    networks = tuple(m[0] for m in members)
    contracts = tuple({**m[1], **contract_extra} for m in members)
    return LoadedModel(networks, contracts[0], tuple(f"m{i}" for i in range(len(members))), (None,) * len(members),
                       member_contracts=contracts if len(members) > 1 else (), weights_sha256=("0" * 64,) * len(members))


def _scan(tmp_path: Path, shape: tuple[int, ...] = (23, 31, 13), border: int = 0) -> Path:
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 1, shape).astype(np.float32)
    if border:
        volume[:border] = 0
        volume[:, -border:] = 0
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    return path


def _both(model: LoadedModel, path: Path, monkeypatch: pytest.MonkeyPatch, **options: object):
    out = []
    for mode in ("full", "bounded"):
        monkeypatch.setenv("MEDSEG_PREDICT_SCORES", mode)
        predictor = SegmentationPredictor(model, PredictOptions(**options), torch.device("cpu"))
        out.append(predictor.predict(path, "case", keep_probabilities=True))
    return out


@pytest.mark.parametrize("overrides, options, extra", [
    ([], {}, {}),  # odd shape, permuted and flipped axes, patch bigger than an axis (padding)
    (["patch.size=[8,8,8]", "validation.sw_batch_size=3", "validation.overlap=0.5"], {}, {}),
    (["patch.size=[16,16,8]"], {"tta": True}, {"tta_axes": [1, 2]}),  # flips that keep the swept axis
    (["patch.size=[16,16,8]", "postprocess.min_component_size={a: 40, b: 40, c: 40}"], {"keep_largest": True}, {}),
], ids=["plain", "small-patch-batch-3", "tta", "postprocess"])
def test_bounded_masks_and_probabilities_are_the_full_buffers_bitwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], options: dict, extra: dict) -> None:
    model = _model(_member(["patch.size=[16,16,32]", *overrides] if not overrides else overrides), **extra)
    full, bounded = _both(model, _scan(tmp_path), monkeypatch, **options)
    assert full.label_map.shape == (23, 31, 13) and len(np.unique(full.label_map)) >= 3
    assert np.array_equal(full.label_map, bounded.label_map)
    assert np.array_equal(full.probabilities, bounded.probabilities)
    np.testing.assert_array_equal(full.affine, bounded.affine)
    assert full.voxels == bounded.voxels
    assert full.uncertainty["agreement"] == bounded.uncertainty["agreement"]
    assert full.uncertainty["mean_entropy"] == pytest.approx(bounded.uncertainty["mean_entropy"], rel=1e-6)


def test_bounded_ensemble_of_different_patches_and_foreground_crop(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    crop = ["preprocess.crop_foreground=true"]
    model = _model(_member(["patch.size=[16,16,8]", *crop], 0), _member(["patch.size=[8,16,16]", *crop], 1))
    full, bounded = _both(model, _scan(tmp_path, (29, 26, 15), border=4), monkeypatch)
    assert (full.label_map[:4] == 0).all()  # the cropped border: background, as Invertd pads it
    assert np.array_equal(full.label_map, bounded.label_map)
    assert np.array_equal(full.probabilities, bounded.probabilities)
    assert full.uncertainty["agreement"] == bounded.uncertainty["agreement"] is not None


def test_bounded_resampling_model_agrees_to_rounding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(_member(["patch.size=[16,16,8]", "preprocess.spacing=[1.3,0.8,1.7]"]))
    full, bounded = _both(model, _scan(tmp_path), monkeypatch)
    # its own interpolation, not Invertd's: the same to float rounding, so only near-ties may differ
    np.testing.assert_allclose(full.probabilities, bounded.probabilities, atol=1e-5)
    assert (full.label_map == bounded.label_map).mean() > 0.999


def test_plan_takes_the_exact_sweep_and_keeps_the_full_buffer_where_the_sweep_would_not_be_exact() -> None:
    contract = {"patch_size": [96, 96, 64], "sliding_window": {"sw_batch_size": 4}}
    shape = (512, 512, 300)
    common = {"classes": 3, "samples": 1, "overlap": 0.25}
    plan = plan_scores(contract, shape, shape, flip_axes=[()], available=64 << 30, **common)
    assert plan.bounded and plan.axis == 0 and plan.exact and plan.bounded_bytes < plan.full_bytes / 2
    mirrored = [(), (0,), (1,), (0, 1)]
    plan = plan_scores(contract, shape, shape, flip_axes=mirrored, available=64 << 30, **common)
    assert not plan.bounded and "fits" in plan.reason  # a flip turns the first axis round: not bitwise
    plan = plan_scores(contract, shape, shape, flip_axes=mirrored, available=1 << 30, **common)
    assert plan.bounded and plan.axis == 2 and not plan.exact
    plan = plan_scores(contract, shape, shape, flip_axes=[(), (0, 1, 2)], available=1 << 30, **common)
    assert not plan.bounded and "every axis" in plan.reason
    whole_body = plan_scores(contract, (273, 273, 1000), (512, 512, 1000), flip_axes=[()], available=16 << 30,
                             resampled=True, classes=100, samples=1, overlap=0.25)
    assert whole_body.bounded and whole_body.axis == 2 and whole_body.full_bytes > 100 << 30


@pytest.mark.parametrize("shape, overrides", [
    ((37, 17, 11), ["patch.size=[8,8,8]", "validation.sw_batch_size=3", "validation.overlap=0.5"]),  # batches span rows
    ((9, 40, 21), ["patch.size=[16,8,8]", "validation.sw_batch_size=2"]),  # first axis shorter than the patch
])
def test_bounded_ct_window_model_with_many_classes_is_the_full_buffers_bitwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], overrides: list[str]) -> None:
    """Six classes behind a CT window (scaled a slab at a time), odd shapes, an affine that permutes and
    flips axes: the same masks and probabilities both ways."""
    labels = "data.labels={0: background, 1: a, 2: b, 3: c, 4: d, 5: e}"
    window = ["preprocess.intensity.mode=ct_window", "preprocess.intensity.window=[-1.5,2.0]"]
    model = _model(_member([*overrides, labels, *window], seed=3))
    full, bounded = _both(model, _scan(tmp_path, shape), monkeypatch)
    assert full.label_map.shape == shape and len(np.unique(full.label_map)) >= 4
    assert np.array_equal(full.label_map, bounded.label_map)
    assert np.array_equal(full.probabilities, bounded.probabilities)


def test_slabwise_ct_window_is_monais_bitwise() -> None:
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRanged

    import medseg.data.transforms as transforms

    image = MetaTensor(torch.randn(1, 37, 23, 11, generator=torch.Generator().manual_seed(0)) * 500,
                       affine=torch.tensor(AFFINE, dtype=torch.float64))
    whole = ScaleIntensityRanged("image", a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True)({"image": image})["image"]
    slabs = transforms.SlabwiseScaleIntensityRanged("image", a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transforms, "SLAB_VOXELS", 5 * 23 * 11)  # eight slabs, the last one short
        out = slabs({"image": image})["image"]
    assert isinstance(out, MetaTensor) and isinstance(whole, MetaTensor) and out.dtype == whole.dtype
    assert torch.equal(out.as_tensor(), whole.as_tensor()) and torch.equal(out.affine, whole.affine)


def test_bounded_estimate_of_a_known_scan() -> None:
    """512x512x300, 3 classes, patch 96x96x64, batches of 4, overlap 0.25, swept along the first axis:
    one patch of open slices (96 of 512x300 voxels, 3 scores each), one batch of 4 windows'
    scores, four 8 MiB pieces, one byte a voxel of labels."""
    from medseg.tasks.segmentation.bounded import bounded_scores_bytes, prediction_memory

    expected = 4 * 3 * 96 * 512 * 300 + 4 * 4 * 3 * 96 * 96 * 64 + 4 * (8 << 20) + 512 * 512 * 300
    assert bounded_scores_bytes(3, (512, 512, 300), (96, 96, 64), 0, 4, 0.25) == expected
    contract = {"patch_size": [96, 96, 64], "sliding_window": {"sw_batch_size": 4, "overlap": 0.25},
                "labels": {0: "background", 1: "a", 2: "b"}, "spacing": None}
    need = prediction_memory((512, 512, 300), (0.7, 0.7, 1.5), contract, available=64 << 30)
    assert need.bounded and need.axis == 0 and need.bounded_bytes == expected
    assert need.full_bytes == 4 * (3 * 512 * 512 * 300 + 3 * 512 * 512 * 300 + 512 * 512 * 300)


@pytest.mark.parametrize("shape, overrides, options, extra", [
    ((37, 17, 11), ["patch.size=[8,8,8]", "validation.sw_batch_size=3", "validation.overlap=0.5"], {}, {}),
    ((9, 40, 21), ["patch.size=[16,8,8]", "validation.sw_batch_size=1"], {}, {}),  # padded: windowed whole first
    ((23, 31, 13), ["patch.size=[16,16,8]"], {"tta": True}, {"tta_axes": [1, 2]}),
], ids=["batches-span-rows", "padded-batch-1", "tta"])
def test_bounded_int16_ct_with_the_window_deferred_is_the_full_buffers_bitwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], overrides: list[str],
        options: dict, extra: dict) -> None:
    """An int16 CT: the prediction chain keeps it int16 and leaves the CT window to the sweep, which
    windows each batch of windows as it cuts them out (the full path windows the whole volume): the
    same masks and probabilities both ways."""
    from medseg.data.transforms import WINDOW

    window = ["preprocess.intensity.mode=ct_window", "preprocess.intensity.window=[-160,240]"]
    model = _model(_member([*overrides, *window], seed=5), **extra)
    rng = np.random.default_rng(1)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(40, 150, shape).astype(np.int16), AFFINE), path)
    prepared = SegmentationPredictor(model, PredictOptions(), torch.device("cpu")).prepare(path, "case")
    assert prepared["image"].dtype == torch.int16 and WINDOW in prepared  # what the saving rests on
    full, bounded = _both(model, path, monkeypatch, **options)
    assert full.label_map.shape == shape and len(np.unique(full.label_map)) >= 2
    assert np.array_equal(full.label_map, bounded.label_map)
    assert np.array_equal(full.probabilities, bounded.probabilities)


def test_inexact_sweep_of_many_classes_runs_smaller_batches() -> None:
    """100 classes of a 96x96x64 patch are 236 MB of scores a window: an inexact sweep (here a
    resampling whole-body model along its last axis) runs them one at a time, and its estimate counts
    one window's; the exact sweep keeps the contract's batch (the full buffer's sums are made in it)."""
    from medseg.tasks.segmentation.bounded import BATCH_SCORES_BYTES, batch_cap, bounded_scores_bytes

    patch = (96, 96, 64)
    assert batch_cap(100, patch, 4) == 1 and batch_cap(3, patch, 4) == 4 and batch_cap(30, patch, 4) == 3
    assert 3 * 4 * 30 * 96 * 96 * 64 <= BATCH_SCORES_BYTES < 4 * 4 * 30 * 96 * 96 * 64
    contract = {"patch_size": list(patch), "sliding_window": {"sw_batch_size": 4}}
    plan = plan_scores(contract, (273, 273, 1000), (512, 512, 1000), flip_axes=[()], available=16 << 30,
                       resampled=True, classes=100, samples=1, overlap=0.25)
    assert not plan.exact and plan.bands == (0, 1) and plan.bounded_bytes == bounded_scores_bytes(
        100, (273, 273, 1000), patch, 2, 1, 0.25, native_plane=512 * 512, bands=(0, 1))
    slabs = bounded_scores_bytes(100, (273, 273, 1000), patch, 2, 1, 0.25, native_plane=512 * 512)
    assert plan.bounded_bytes < 0.5 * slabs  # what the windows still reach, not a patch-thick whole plane
    exact = plan_scores(contract, (512, 512, 300), (512, 512, 300), flip_axes=[()], available=64 << 30,
                        classes=100, samples=1, overlap=0.25)
    assert exact.exact and exact.bounded_bytes == bounded_scores_bytes(100, (512, 512, 300), patch, 0, 4, 0.25)


def test_a_read_scan_is_handed_back_as_the_sweep_passes_and_a_callers_tensor_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows a single sweep has passed are handed back (madvise) when the scan was read here; the
    masks stay the full buffer's. A caller's tensor is never touched."""
    import medseg.tasks.segmentation.bounded as bounded
    from medseg.io.heap import release_pages

    released: list[int] = []

    def counted(address: int, length: int) -> int:
        released.append(release_pages(address, length))
        return released[-1]

    monkeypatch.setattr(bounded, "release_pages", counted)
    window = ["preprocess.intensity.mode=ct_window", "preprocess.intensity.window=[-160,240]"]
    model = _model(_member(["patch.size=[16,16,16]", "validation.sw_batch_size=2", *window], seed=7))
    shape = (96, 64, 40)  # 5 KiB a row of int16: whole pages are handed back
    path = tmp_path / "ct.nii.gz"
    lps = np.diag([-0.7, -0.7, 1.5, 1.0])  # as a CT is stored: reoriented to RAS by flips into a new array
    nib.save(nib.Nifti1Image(np.random.default_rng(2).normal(40, 150, shape).astype(np.int16), lps), path)
    full, bounded_run = _both(model, path, monkeypatch)
    assert np.array_equal(full.label_map, bounded_run.label_map)
    assert np.array_equal(full.probabilities, bounded_run.probabilities)
    assert sum(released) > 0.9 * np.prod(shape) * 2  # nearly the whole int16 scan, a row range at a time
    released.clear()
    from monai.transforms import LoadImage

    given = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)(str(path))  # the caller's int16
    assert given.dtype == torch.int16
    kept = given.clone()
    SegmentationPredictor(model, PredictOptions(), torch.device("cpu")).predict(given, "case")
    assert not released and torch.equal(given, kept)


def test_tile_band_estimate_of_the_whole_body_scan() -> None:
    """273x273x1000 on the network grid (512x512x1000 at 0.8x0.8x1.5 mm resampled to 1.5 mm), 100 classes,
    patch 96x96x64, overlap 0.25, swept along the last axis in tiles along the other two: the overlap of
    two rows (16 slices) over the whole plane; for the rest of a row (48 slices), the overlap of two
    columns (24 wide) along the whole second axis and the rest of one window (72x96); one window's
    scores; four pieces of 8 MiB (a tile's slice is less); two whole network slices and a tile's
    interpolation on the input's grid."""
    from medseg.tasks.segmentation.bounded import tile_band_bytes

    k, plane = 100, 273 * 273
    expected = (4 * k * (16 * plane + 48 * (24 * 273 + 72 * 96)) + 4 * k * 96 * 96 * 64 + 4 * (8 << 20)
                + 2 * 4 * k * plane + 4 * 4 * k * 512 * 512 * 96 * 96 // plane)
    assert tile_band_bytes(k, (273, 273, 1000), (96, 96, 64), 2, (0, 1), 1, 0.25, native_plane=512 * 512) == expected


def _forced_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole slabs along the same axis where the plan would cut tiles (the sweep before tiles)."""
    import dataclasses

    planned = SegmentationPredictor.scores_plan
    monkeypatch.setattr(SegmentationPredictor, "scores_plan",
                        lambda self, volume: dataclasses.replace(planned(self, volume), bands=()))


@pytest.mark.parametrize("shape, affine, patch, spacing", [
    ((29, 23, 17), AFFINE, [8, 8, 8], [1.3, 0.7, 1.9]),  # permuted, flipped; 8-voxel windows over odd extents
    ((19, 41, 26), np.diag([0.8, -0.6, 1.4, 1.0]), [16, 8, 16], [0.9, 1.3, 1.1]),  # the band is the patch's 16
], ids=["permuted-flipped", "flipped-y"])
def test_tiled_sweep_of_many_classes_is_the_whole_slabs_bitwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], affine: np.ndarray,
        patch: list[int], spacing: list[float]) -> None:
    """A resampling model with 23 classes, an odd shape, anisotropic voxels, an affine that permutes
    and flips axes, windows whose columns do not divide the plane: the tiled sweep (slabs cut into
    columns of windows, each input slice made tile by tile) gives the whole-slab sweep's masks and
    probabilities bitwise, and the full buffer's to float rounding."""
    labels = "data.labels={" + ", ".join(f"{i}: c{i}" for i in range(23)) + "}"
    sizes = "[" + ",".join(map(str, patch)) + "]"
    model = _model(_member([f"patch.size={sizes}", "validation.overlap=0.25", "validation.sw_batch_size=3", labels,
                            f"preprocess.spacing=[{','.join(map(str, spacing))}]"], seed=11))
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(3).normal(0, 1, shape).astype(np.float32), affine), path)
    from medseg.tasks.segmentation.slab_resample import SlabResampler

    tiles: set = set()
    add = SlabResampler.add

    def seen(self: SlabResampler, start: int, stop: int, probs: torch.Tensor, ranges=None) -> None:
        tiles.add(None if ranges is None else tuple(ranges))
        add(self, start, stop, probs, ranges)

    monkeypatch.setattr(SlabResampler, "add", seen)
    full, tiled = _both(model, path, monkeypatch)
    assert None not in tiles and len({r[0] for r in tiles}) >= 3 and len({r[1] for r in tiles}) >= 3
    predictor = SegmentationPredictor(model, PredictOptions(), torch.device("cpu"))
    monkeypatch.setenv("MEDSEG_PREDICT_SCORES", "bounded")
    plan = predictor.scores_plan(predictor.prepare(path, "case")["image"])
    assert plan.bounded and plan.bands and plan.axis not in plan.bands
    _forced_slabs(monkeypatch)
    whole = predictor.predict(path, "case", keep_probabilities=True)
    assert tiled.label_map.shape == shape and len(np.unique(tiled.label_map)) >= 5
    assert np.array_equal(tiled.label_map, whole.label_map)
    assert np.array_equal(tiled.probabilities, whole.probabilities)
    np.testing.assert_allclose(full.probabilities, tiled.probabilities, atol=1e-5)
    assert (full.label_map == tiled.label_map).mean() > 0.99


def test_large_scan_resampled_slab_by_slab_inverts_and_agrees_with_spacingd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prediction chain resamples a large scan slab by slab (here every scan: the threshold set to 0,
    slabs of 3 rows): the same grid and transform record as MONAI's Spacingd, values to float rounding,
    and the full path's Invertd undoes it (the record is Spacingd's own)."""
    import medseg.data.slab_spacing as slab_spacing
    from medseg.data.transforms import IMAGE

    model = _model(_member(["patch.size=[16,16,8]", "preprocess.spacing=[1.3,0.8,1.7]"]))
    path = _scan(tmp_path)
    whole = SegmentationPredictor(model, PredictOptions(), torch.device("cpu")).prepare(path, "case")[IMAGE]
    monkeypatch.setattr(slab_spacing, "WHOLE_BYTES", 0)
    monkeypatch.setattr(slab_spacing, "SLAB_VOXELS", 3 * 31 * 13)
    slabs = SegmentationPredictor(model, PredictOptions(), torch.device("cpu")).prepare(path, "case")[IMAGE]
    assert slabs.shape == whole.shape and torch.equal(slabs.affine, whole.affine)
    torch.testing.assert_close(slabs.as_tensor(), whole.as_tensor(), rtol=0, atol=1e-5)
    assert [op["class"] for op in slabs.applied_operations] == [op["class"] for op in whole.applied_operations]
    full, bounded = _both(model, path, monkeypatch)
    assert full.label_map.shape == bounded.label_map.shape == (23, 31, 13)
    np.testing.assert_allclose(full.probabilities, bounded.probabilities, atol=1e-5)


def test_a_long_resampled_scan_is_laid_out_rows_first_and_handed_back_as_the_tiled_sweep_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resampled slab by slab, a long scan is laid out with its longest axis outermost (the axis the
    sweep takes), so the tiled sweep hands its passed rows back as it goes; the masks stay the full
    buffer's to rounding."""
    import medseg.data.slab_spacing as slab_spacing
    import medseg.tasks.segmentation.bounded as bounded
    from medseg.data.transforms import IMAGE
    from medseg.io.heap import release_pages

    released: list[int] = []

    def counted(address: int, length: int) -> int:
        released.append(release_pages(address, length))
        return released[-1]

    monkeypatch.setattr(bounded, "release_pages", counted)
    monkeypatch.setattr(slab_spacing, "WHOLE_BYTES", 0)
    model = _model(_member(["patch.size=[16,16,16]", "preprocess.spacing=[0.9,0.9,1.6]",
                            "data.labels={0: background, 1: a, 2: b, 3: c, 4: d, 5: e, 6: f}"], seed=13))
    path = tmp_path / "long.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(4).normal(0, 1, (40, 36, 90)).astype(np.float32),
                             np.diag([-0.8, -0.8, 1.5, 1.0])), path)
    predictor = SegmentationPredictor(model, PredictOptions(), torch.device("cpu"))
    image = predictor.prepare(path, "case")[IMAGE]
    assert image.stride(3) == image.shape[1] * image.shape[2]  # the long axis outermost
    monkeypatch.setenv("MEDSEG_PREDICT_SCORES", "bounded")
    plan = predictor.scores_plan(image)
    assert plan.axis == 2 and plan.bands == (0, 1)
    full, tiled = _both(model, path, monkeypatch)
    assert sum(released) > 0.8 * image.numel() * 4  # nearly every row, a run of rows at a time
    np.testing.assert_allclose(full.probabilities, tiled.probabilities, atol=1e-5)
    assert (full.label_map == tiled.label_map).mean() > 0.99
