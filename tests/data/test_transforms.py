"""Transform chains built from config do what the config says on awkward volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import (
    AffineAug,
    BiasFieldAug,
    ContrastAug,
    ElasticAug,
    FlipAug,
    GammaAug,
    GibbsAug,
    IntensityConfig,
    KSpaceSpikeAug,
    NoiseAug,
    PatchConfig,
    PreprocessConfig,
    Rot90Aug,
)
from medseg.data.transforms import augmentation, training_transforms, validation_transforms
from medseg.io.geometry import geometry_of
from tests.conftest import make_case


def _write(tmp_path: Path, shape=(29, 37, 23), spacing=(0.9, 1.1, 2.3)) -> dict[str, str]:
    image, label, affine = make_case(shape, seed=3, spacing=spacing)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lbl.nii.gz")
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lbl.nii.gz"), "case_id": "c"}


def test_resampling_reaches_the_target_spacing_and_keeps_labels_integer(tmp_path: Path) -> None:
    item = _write(tmp_path)
    pre = PreprocessConfig(orientation="RAS", spacing=(1.5, 1.5, 2.0), intensity=IntensityConfig(mode="zscore"))
    out = validation_transforms(pre)(item)
    geometry = geometry_of(out["image"])
    assert np.allclose(geometry.spacing, (1.5, 1.5, 2.0), atol=1e-4)
    assert out["image"].shape[1:] == out["label"].shape[1:]
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
    # z-score: zero mean, unit variance over the volume
    assert abs(float(out["image"].mean())) < 1e-3 and abs(float(out["image"].std()) - 1) < 1e-2


def test_ct_window_and_percentile_scale_to_unit_range(tmp_path: Path) -> None:
    item = _write(tmp_path)
    for intensity in (IntensityConfig(mode="ct_window", window=(9.0, 11.0)), IntensityConfig(mode="percentile")):
        out = validation_transforms(PreprocessConfig(intensity=intensity))(item)
        assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
        assert float(out["image"].max()) == pytest.approx(1.0)


def test_training_patches_have_the_patch_size_even_for_small_volumes(tmp_path: Path) -> None:
    item = _write(tmp_path, shape=(11, 13, 7))
    patch = PatchConfig(size=(16, 16, 8), samples_per_volume=3)
    tf = training_transforms(PreprocessConfig(), patch, [FlipAug(name="flip")], spatial_dims=3, num_classes=3)
    samples = tf(item)
    assert len(samples) == 3
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 16, 16, 8)
        assert tuple(sample["label"].shape) == (1, 16, 16, 8)


@pytest.mark.parametrize("sampler", ["pos_neg", "per_class", "uniform"])
def test_every_patch_sampler_builds(tmp_path: Path, sampler: str) -> None:
    item = _write(tmp_path)
    patch = PatchConfig(size=(16, 16, 8), samples_per_volume=2, sampler=sampler)
    samples = training_transforms(PreprocessConfig(), patch, [], spatial_dims=3, num_classes=3)(item)
    assert len(samples) == 2


def test_every_augmentation_runs_in_3d_and_keeps_shapes(tmp_path: Path) -> None:
    augs = [FlipAug(name="flip", prob=1), Rot90Aug(name="rot90", prob=1), AffineAug(name="affine", prob=1),
            ElasticAug(name="elastic", prob=1), NoiseAug(name="noise", prob=1), GammaAug(name="gamma", prob=1),
            ContrastAug(name="contrast", prob=1), BiasFieldAug(name="bias_field", prob=1),
            KSpaceSpikeAug(name="kspace_spike", prob=1), GibbsAug(name="gibbs", prob=1)]
    item = _write(tmp_path)
    patch = PatchConfig(size=(16, 16, 8), samples_per_volume=1)
    samples = training_transforms(PreprocessConfig(), patch, augs, spatial_dims=3, num_classes=3)(item)
    assert tuple(samples[0]["image"].shape) == (1, 16, 16, 8)
    assert set(torch.unique(samples[0]["label"]).tolist()) <= {0, 1, 2}


def test_flip_axes_and_2d_elastic() -> None:
    flips = augmentation([FlipAug(name="flip", axes=[0])], spatial_dims=3)
    assert len(flips) == 1
    (elastic,) = augmentation([ElasticAug(name="elastic", prob=1)], spatial_dims=2)
    data = {"image": torch.rand(1, 20, 24), "label": torch.zeros(1, 20, 24)}
    assert elastic(data)["image"].shape == (1, 20, 24)


def test_foreground_crop_uses_raw_intensities_not_z_scores(tmp_path: Path) -> None:
    # a dark (below-mean) labelled region inside the nonzero body must survive the crop
    image = np.zeros((30, 30, 20), dtype=np.float32)
    image[5:25, 5:25, 3:17] = 100.0
    image[6:9, 6:9, 4:7] = 1.0  # dark but nonzero tissue
    label = np.zeros_like(image, dtype=np.uint8)
    label[6:9, 6:9, 4:7] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "l.nii.gz")
    pre = PreprocessConfig(crop_foreground=True, intensity=IntensityConfig(mode="zscore"))
    out = validation_transforms(pre)({"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")})
    assert tuple(out["image"].shape[1:]) == (20, 20, 14)
    assert int(out["label"].sum()) == 27


def test_every_augmentation_of_the_config_has_one_entry_in_the_table() -> None:
    """The config's augmentation union and the transform table grow together."""
    import typing

    from medseg.config import AugmentConfig
    from medseg.data.transforms import AUGMENTATIONS

    union = typing.get_args(typing.get_args(AugmentConfig)[0])
    names = {typing.get_args(member.model_fields["name"].annotation)[0] for member in union}
    assert names == set(AUGMENTATIONS)
