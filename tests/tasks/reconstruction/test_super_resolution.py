"""Super-resolution on the reconstruction engine: a real thick-slice scan goes onto its thin grid
(the right axis found in the file's own voxel order, the right affine), a tiny run scores the
network beside linear interpolation, and ``medseg predict --measured`` writes both on the thin grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

import medseg
from medseg.data.build import build_manifest
from medseg.errors import CaseError
from medseg.tasks.reconstruction.config import SuperResolutionConfig
from medseg.tasks.reconstruction.slice_profile import simulate_thick, thin_affine, upsample
from medseg.tasks.reconstruction.super_resolution import file_axis, to_thin_grid
from tests.conftest import oblique_affine, train_run, write_config, write_msd_dataset


def _reordered(volume: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another voxel order (``codes``, e.g. ``"SLA"``): the same world."""
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(affine)), axcodes2ornt(tuple(codes)))
    image = nib.Nifti1Image(volume, affine).as_reoriented(transform)
    assert np.allclose(apply_orientation(volume, transform), np.asarray(image.dataobj))
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize("codes,expected", [("RAS", 2), ("SLA", 0), ("PIR", 1)])
def test_the_thick_axis_is_found_in_the_files_own_voxel_order(codes: str, expected: int) -> None:
    volume = np.zeros((4, 5, 6), dtype=np.float32)
    _, affine = _reordered(volume, oblique_affine((0.9, 1.2, 3.0), (1.0, 2.0, 3.0)), codes)
    assert file_axis(affine, "RAS", 2) == expected  # the model's S axis
    assert file_axis(affine, None, 2) == 2  # no orientation in the contract: the file's order is the model's


@pytest.mark.parametrize("codes", ["RAS", "SLA"])
def test_a_thick_volume_goes_back_onto_the_thin_grid_it_was_measured_on(codes: str) -> None:
    sr = SuperResolutionConfig(factor=3, axis=2, profile="box")
    thin_grid = oblique_affine((0.8, 1.1, 0.7), (-20.0, 3.5, 41.0), angle_deg=31.0)
    thin = np.random.default_rng(0).random((8, 9, 14)).astype(np.float32)
    thick, thick_grid = simulate_thick(thin, thin_grid, 2, sr)
    stored, stored_affine = _reordered(thick, thick_grid, codes)
    volume = MetaTensor(torch.from_numpy(np.ascontiguousarray(stored))[None], affine=torch.as_tensor(stored_affine))
    out = to_thin_grid(volume, "RAS", sr, "thick.nii.gz")
    axis = file_axis(stored_affine, "RAS", 2)
    assert out.shape[1 + axis] == 12 and out.shape[1:] == tuple(
        12 if a == axis else s for a, s in enumerate(stored.shape))  # 14 thin slices hold 4 whole thick ones
    np.testing.assert_allclose(np.asarray(out.affine), thin_affine(stored_affine, axis, 3), atol=1e-9)
    np.testing.assert_allclose(out.meta["original_affine"], np.asarray(out.affine))
    back, back_affine = _reordered(out.as_tensor()[0].numpy(), np.asarray(out.affine), "RAS")
    np.testing.assert_allclose(back_affine, thin_grid, atol=1e-9)  # the first 12 thin slices' own grid
    np.testing.assert_allclose(back, upsample(thick, 2, 3), atol=1e-5)


def test_a_volume_that_cannot_be_super_resolved_is_refused_by_name() -> None:
    sr = SuperResolutionConfig(factor=2, axis=2)
    with pytest.raises(CaseError, match="flat.nii.gz: super-resolution takes a single-channel 3D volume"):
        to_thin_grid(MetaTensor(torch.zeros(1, 5, 6)), "RAS", sr, "flat.nii.gz")
    with pytest.raises(CaseError, match="expected at least 2 slices along the through-plane axis"):
        to_thin_grid(MetaTensor(torch.zeros(1, 5, 6, 1)), "RAS", sr, "one.nii.gz")


@pytest.mark.slow
@pytest.mark.parametrize("context", [0, 1])  # 1: 2.5D, each slice with a neighbour on either side as channels
def test_a_tiny_sr_run_scores_beside_linear_interpolation_and_super_resolves_a_thick_scan(tmp_path: Path,
                                                                                         context: int) -> None:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=5)  # 29 x 37 x 23 on oblique 0.9/1.1/2.3 mm grids
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.2, test_fraction=0.2, seed=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path, {
        "task": "reconstruction", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest), "root": str(dataset)}, "preprocess": {"orientation": "RAS"},
        "recon": {"problem": "sr", "image_size": [40, 24], "slice_axis": 0, "slices_per_volume": 2,
                  "sr": {"factor": 3, "axis": 2, "profile": "gaussian", "context": context}},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0, 1]}],
        "model": {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        "train": {"max_epochs": 1, "batch_size": 2, "iterations_per_epoch": 2, "num_threads": 1},
        "validation": {"overlays": 1}, "tracking": {"uri": uri, "experiment": "tests"}}, {})
    result = train_run(config)
    for key in ("test/psnr", "test/trilinear_psnr", "test/ssim_gain"):
        assert np.isfinite(result.metrics[key]), key

    thin_image = nib.load(sorted((dataset / "imagesTr").iterdir())[0])
    thick, thick_grid = simulate_thick(np.asarray(thin_image.dataobj, dtype=np.float32), thin_image.affine, 2,
                                       SuperResolutionConfig(factor=3, axis=2))
    stored, stored_affine = _reordered(thick, thick_grid, "SLA")  # the thick axis first in the file
    (tmp_path / "thick").mkdir()
    nib.save(nib.Nifti1Image(stored, stored_affine), tmp_path / "thick" / "scan.nii.gz")
    batch = medseg.Predictor.from_uri(result.model_uri, tracking_uri=uri, measured=True).predict_folder(
        tmp_path / "thick", tmp_path / "thin", progress=False)
    assert batch.n_failed == 0
    expected_affine = thin_affine(stored_affine, 0, 3)
    for suffix in ("reconstruction", "trilinear"):
        written = nib.load(tmp_path / "thin" / f"scan_{suffix}.nii.gz")
        assert written.shape == (21, 29, 37)  # 7 thick slices -> 21 thin ones, in the file's own order
        np.testing.assert_allclose(written.affine, expected_affine, atol=1e-4)
    trilinear = np.asarray(nib.load(tmp_path / "thin" / "scan_trilinear.nii.gz").dataobj)
    np.testing.assert_allclose(trilinear, upsample(stored, 0, 3), rtol=1e-4, atol=1e-4)  # in the input's units
