"""The prediction chain reads a scan in its stored type (a CT's int16) and casts it to float32 late:
every value and the affine must be the float32 chain's, bitwise, whatever comes after the cast."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medseg.config import IntensityConfig, PreprocessConfig
from medseg.data.transforms import IMAGE, preprocessing

#: voxel axes -> world: LPS-like (flipped x and y), anisotropic, so Orientationd to RAS moves voxels
AFFINE = np.array([[-0.7, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, -5.0], [0.0, 0.0, 1.5, 3.0], [0, 0, 0, 1]])
CT = IntensityConfig(mode="ct_window", window=(-160.0, 240.0))


def _ct(tmp_path: Path, slope: float | None = None) -> Path:
    """An int16 CT-like volume (a body of soft tissue in air, noise, a zero border to crop)."""
    rng = np.random.default_rng(0)
    volume = (rng.normal(40, 200, (21, 17, 9)).clip(-1000, 3000)).astype(np.int16)
    volume[:3] = 0
    image = nib.Nifti1Image(volume, AFFINE)
    if slope is not None:  # nibabel gives a scaled volume back as float64
        image.header.set_slope_inter(slope, -3.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(image, path)
    return path


@pytest.mark.parametrize("cfg, slope", [
    (PreprocessConfig(orientation="RAS", intensity=CT), None),  # cast slab by slab in the window
    (PreprocessConfig(orientation="RAS", intensity=CT), 0.5),  # float64 from the reader
    (PreprocessConfig(orientation="RAS", spacing=(1.1, 0.9, 2.0), intensity=CT), None),  # cast before Spacingd
    (PreprocessConfig(orientation="RAS", crop_foreground=True, intensity=CT), None),
    (PreprocessConfig(orientation="RAS", intensity=IntensityConfig(mode="zscore")), None),
    (PreprocessConfig(orientation="RAS", intensity=IntensityConfig(mode="none")), None),
], ids=["ct-window", "scaled-float64", "spacing", "crop", "zscore", "none"])
def test_stored_dtype_chain_is_the_float32_chains_bitwise(tmp_path: Path, cfg: PreprocessConfig,
                                                          slope: float | None) -> None:
    path = _ct(tmp_path, slope)
    late = Compose(preprocessing(cfg, keys=(IMAGE,), stored_dtype=True))({IMAGE: str(path)})[IMAGE]
    early = Compose(preprocessing(cfg, keys=(IMAGE,)))({IMAGE: str(path)})[IMAGE]
    assert late.dtype == early.dtype == torch.float32
    assert torch.equal(late.as_tensor(), early.as_tensor())
    assert torch.equal(late.affine, early.affine)
    assert [op["class"] for op in late.applied_operations] == [op["class"] for op in early.applied_operations]


def test_stored_dtype_chain_reads_int16_and_narrows_float64(tmp_path: Path) -> None:
    """What the memory saving rests on: the read volume is the file's int16 (half of float32), and a
    scaled one float32 at once (nibabel's float64 would be twice float32)."""
    cfg = PreprocessConfig(orientation="RAS", intensity=CT)
    chain = preprocessing(cfg, keys=(IMAGE,), stored_dtype=True)
    read = Compose(chain[:3])({IMAGE: str(_ct(tmp_path))})[IMAGE]  # reader, EnsureTyped, NarrowFloatd
    assert read.dtype == torch.int16
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    read = Compose(chain[:3])({IMAGE: str(_ct(scaled, slope=0.5))})[IMAGE]
    assert read.dtype == torch.float32
