"""The thick-slice simulation of super-resolution, by known answers: what a profile does to a
constant and to one bright slice, where the thick slices lie in the world, and the way back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medseg.tasks.reconstruction.config import ReconConfig, SuperResolutionConfig
from medseg.tasks.reconstruction.operators import Acquisition
from medseg.tasks.reconstruction.slice_profile import (
    profile_weights,
    simulate_thick,
    thick_affine,
    thick_slices,
    thin_affine,
    upsample,
)
from tests.conftest import oblique_affine


@pytest.mark.parametrize("factor", [2, 3, 5])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_box_profile_as_wide_as_the_factor_keeps_a_constant_volume_constant(factor: int, axis: int) -> None:
    volume = np.full((11, 13, 17), 4.25, dtype=np.float32)
    thick, _ = simulate_thick(volume, np.eye(4), axis, SuperResolutionConfig(factor=factor, axis=axis, profile="box"))
    expected = list(volume.shape)
    expected[axis] = volume.shape[axis] // factor  # the remainder is not measured
    assert list(thick.shape) == expected
    np.testing.assert_allclose(thick, 4.25, rtol=1e-6)


@pytest.mark.parametrize("profile,gap", [("gaussian", 0.0), ("box", 1.0), ("gaussian", 1.5)])
def test_every_profile_keeps_a_constant_up_to_the_edges(profile: str, gap: float) -> None:
    volume = np.full((7, 5, 19), -3.0)
    thick, _ = simulate_thick(volume, np.eye(4), 2, SuperResolutionConfig(factor=4, profile=profile, gap=gap))
    np.testing.assert_allclose(thick, -3.0)


def test_one_bright_slice_spreads_as_the_box_profile_says() -> None:
    line = np.zeros(12)
    line[4] = 1.0  # thin slice 4 lies in thick slice 1 (thin 3..5)
    np.testing.assert_allclose(thick_slices(line, 0, SuperResolutionConfig(factor=3, profile="box")), [0, 1 / 3, 0, 0])
    # a 1-voxel gap at 4x: slices 3 voxels thick centred on 5.5 see thin 4 and 7 by half
    spread = profile_weights(12, SuperResolutionConfig(factor=4, profile="box", gap=1.0))[1]
    np.testing.assert_allclose(spread, [0, 0, 0, 0, 1 / 6, 1 / 3, 1 / 3, 1 / 6, 0, 0, 0, 0])


def test_one_bright_slice_spreads_as_the_gaussian_profile_says() -> None:
    sigma = 3.0 / (2 * math.sqrt(2 * math.log(2)))  # FWHM = thickness = 3 thin voxels
    line = np.zeros(15)
    line[7] = 1.0
    thick = thick_slices(line, 0, SuperResolutionConfig(factor=3, profile="gaussian"))
    for j, value in enumerate(thick):
        centre = 3 * j + 1
        reach = np.arange(15)[np.abs(np.arange(15) - centre) <= 3 * sigma]
        norm = np.exp(-0.5 * ((reach - centre) / sigma) ** 2).sum()
        expected = math.exp(-0.5 * ((7 - centre) / sigma) ** 2) / norm if abs(7 - centre) <= 3 * sigma else 0.0
        assert value == pytest.approx(expected), j
    assert thick.argmax() == 2 and thick[1] == pytest.approx(thick[3])  # thin 7 is thick 2's centre


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_thick_affine_puts_each_thick_slice_at_the_centre_of_its_thin_slices(axis: int) -> None:
    spacing = (0.7, 0.9, 1.1)
    affine = oblique_affine(spacing, (-12.0, 30.5, 7.25), angle_deg=23.0)
    factor = 3
    thick = thick_affine(affine, axis, factor)
    assert np.linalg.norm(thick[:3, axis]) == pytest.approx(factor * spacing[axis])  # slice spacing
    for other in {0, 1, 2} - {axis}:
        np.testing.assert_allclose(thick[:3, other], affine[:3, other])  # in-plane untouched
    for j in range(4):
        voxel = np.zeros(4)
        voxel[3], voxel[axis] = 1.0, j
        thin_voxels = [np.eye(4)[axis] * (j * factor + i) + np.eye(4)[3] for i in range(factor)]
        np.testing.assert_allclose(thick @ voxel, np.mean([affine @ v for v in thin_voxels], axis=0), atol=1e-9)
    np.testing.assert_allclose(thin_affine(thick, axis, factor), affine, atol=1e-12)  # exact round trip


def test_simulate_thick_returns_the_thick_grid_of_an_oblique_anisotropic_volume() -> None:
    affine = oblique_affine((0.8, 1.3, 0.6), (5.0, -7.0, 11.0))
    volume = np.random.default_rng(0).random((9, 10, 23)).astype(np.float32)
    thick, grid = simulate_thick(volume, affine, 2, SuperResolutionConfig(factor=5, profile="box"))
    assert thick.shape == (9, 10, 4) and thick.dtype == np.float32
    np.testing.assert_allclose(thick[..., 1], volume[..., 5:10].mean(axis=-1), rtol=1e-5)
    np.testing.assert_allclose(grid, thick_affine(affine, 2, 5))


def test_upsampling_passes_through_the_thick_slices_and_linear_reproduces_a_ramp() -> None:
    factor, thick_count = 3, 6
    thin_index = np.arange(thick_count * factor, dtype=np.float64)
    thick = 2.0 * (np.arange(thick_count) * factor + 1) - 5.0  # a ramp sampled at the thick centres
    linear = upsample(thick, 0, factor)
    inside = slice(1, (thick_count - 1) * factor + 2)  # between the first and last centres
    np.testing.assert_allclose(linear[inside], 2.0 * thin_index[inside] - 5.0, atol=1e-9)
    bumpy = np.random.default_rng(2).random(thick_count)
    for order in (1, 3):  # both interpolate: thin voxel 3j + 1 is thick slice j's centre
        thin = upsample(bumpy, 0, factor, order=order)
        np.testing.assert_allclose(thin[1::factor], bumpy, atol=1e-6)
        assert thin[0] == pytest.approx(bumpy[0]) and thin[-1] == pytest.approx(bumpy[-1])  # edges held
    with pytest.raises(ValueError, match="order 2"):
        upsample(thick, 0, factor, order=2)


def test_the_acquisition_degrades_slices_along_their_thick_axis_as_the_volume_function_does() -> None:
    recon = ReconConfig(problem="sr", slice_axis=0, sr=SuperResolutionConfig(factor=3, axis=2))
    acquisition = Acquisition(recon)
    assert acquisition.baseline_name == "trilinear" and acquisition.degrades_before_padding
    assert acquisition.through_plane_dim == 3  # (N, 1, Y, Z): the S axis is the slices' last
    volume = np.random.default_rng(1).random((5, 8, 14)).astype(np.float32)
    slices = torch.from_numpy(volume)[:, None]  # slice axis 0 first: (X, 1, Y, Z)
    degraded = acquisition.degrade(slices, seed=0)
    assert degraded.shape == slices.shape  # back on the thin grid, the remainder held at the edge
    thick, _ = simulate_thick(volume, np.eye(4), 2, recon.sr)
    expected = upsample(thick, 2, 3, thin_slices=14)
    np.testing.assert_allclose(degraded[:, 0].numpy(), expected, atol=1e-5)


def test_impossible_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="use a gap of at most 2"):
        SuperResolutionConfig(factor=3, gap=2.5)
    with pytest.raises(ValidationError, match="set recon.slice_axis to one of"):
        ReconConfig(problem="sr", slice_axis=2, sr=SuperResolutionConfig(axis=2))
    with pytest.raises(ValueError, match="needs at least 4 thin slices; the axis has 3"):
        profile_weights(3, SuperResolutionConfig(factor=4))
