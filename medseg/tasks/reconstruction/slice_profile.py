"""Thick slices from thin ones and back: the slice-profile model of through-plane super-resolution.

Pure functions, no randomness: the same thin volume always gives the same thick one.

**Thick slices.** At ``factor`` x through-plane, thick slice ``j`` is centred on the thin position
``c_j = j * factor + (factor - 1) / 2`` (it covers thin voxels ``j * factor ... j * factor + factor - 1``)
and is the weighted mean of the thin voxels under its slice profile, whose width is the slice
thickness ``factor - gap`` thin voxels (a gap is the unmeasured space between slices):

* ``box``: each thin voxel weighs its overlap with the slab ``[c_j - t / 2, c_j + t / 2]``;
* ``gaussian``: a Gaussian of that full width at half maximum, cut at 3 sigma.

The weights are normalised over the thin voxels inside the volume, so a constant stays constant
up to the edges. Thin voxels past the last whole thick slice (``n % factor``) are not measured.

**Geometry.** ``thick affine = thin affine @ S`` where ``S`` scales the axis by ``factor`` and moves
the origin by ``(factor - 1) / 2`` thin voxels; the thin grid of a thick volume is ``thick affine @
S^-1``, so the round trip is exact and the thin grid is the one the thick slices were measured on.

**Back to the thin grid.** Thin voxel ``i`` lies at ``(i - (factor - 1) / 2) / factor`` in thick voxel
units; linear interpolation there (trilinear: only one axis changes) or a cubic B-spline (scipy's
``map_coordinates``, order 3); before the first and after the last thick centre the edge value is
kept. MONAI's ``Spacing`` keeps the first voxel's centre fixed, which is not this grid: the thin
grid is fixed by where the thick slices were measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar, cast

import numpy as np
import torch

from medseg.tasks.reconstruction.config import SliceProfile, SuperResolutionConfig

#: A Gaussian's full width at half maximum is this many sigmas.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Gaussian profiles are cut this many sigmas from their centre.
GAUSSIAN_REACH = 3.0

#: a volume or slice batch, numpy or torch: what goes in comes out
Array = TypeVar("Array", np.ndarray, torch.Tensor)


def thick_slice_count(thin_slices: int, factor: int) -> int:
    """Whole thick slices that ``thin_slices`` thin slices hold at ``factor`` x."""
    return thin_slices // factor


def profile_weights(thin_slices: int, sr: SuperResolutionConfig) -> np.ndarray:
    """The (thick, thin) matrix whose row ``j`` is thick slice ``j``'s profile over the thin slices.

    Raises:
        ValueError: the axis holds fewer thin slices than one thick slice needs.
    """
    factor, thickness = sr.factor, sr.thickness
    count = thick_slice_count(thin_slices, factor)
    if count < 1:
        raise ValueError(f"a {factor}x thick slice needs at least {factor} thin slices; the axis has {thin_slices}")
    positions = np.arange(thin_slices, dtype=np.float64)
    weights = np.zeros((count, thin_slices), dtype=np.float64)
    for j in range(count):
        centre = j * factor + (factor - 1) / 2.0
        if SliceProfile(sr.profile) == SliceProfile.BOX:
            low, high = centre - thickness / 2.0, centre + thickness / 2.0
            row = np.clip(np.minimum(positions + 0.5, high) - np.maximum(positions - 0.5, low), 0.0, None)
        else:
            sigma = thickness / FWHM_PER_SIGMA
            row = np.exp(-0.5 * ((positions - centre) / sigma) ** 2)
            row[np.abs(positions - centre) > GAUSSIAN_REACH * sigma] = 0.0
        weights[j] = row / row.sum()
    return weights


def thin_positions(thin_slices: int, factor: int) -> np.ndarray:
    """Where thin voxel ``i`` lies in thick voxel units: ``(i - (factor - 1) / 2) / factor``."""
    return (np.arange(thin_slices, dtype=np.float64) - (factor - 1) / 2.0) / factor


def linear_weights(thick_slices: int, factor: int, thin_slices: int) -> np.ndarray:
    """The (thin, thick) matrix of linear interpolation onto the thin grid, edges held."""
    where = np.clip(thin_positions(thin_slices, factor), 0.0, thick_slices - 1)
    below = np.floor(where).astype(int)
    above = np.minimum(below + 1, thick_slices - 1)
    fraction = where - below
    weights = np.zeros((thin_slices, thick_slices), dtype=np.float64)
    rows = np.arange(thin_slices)
    np.add.at(weights, (rows, below), 1.0 - fraction)
    np.add.at(weights, (rows, above), fraction)
    return weights


def _along(matrix: np.ndarray, volume: Array, axis: int) -> Array:
    """``matrix`` applied along ``axis`` of ``volume`` (numpy or torch, dtype kept)."""
    if isinstance(volume, torch.Tensor):
        weights = torch.as_tensor(matrix, dtype=volume.dtype if volume.is_floating_point() else torch.float32,
                                  device=volume.device)
        last = torch.movedim(volume.to(weights.dtype), axis, -1)
        return torch.movedim(last @ weights.T, -1, axis)
    array = np.moveaxis(np.asarray(volume, dtype=np.float64), axis, -1)
    dtype = volume.dtype if np.issubdtype(volume.dtype, np.floating) else np.float32
    return cast(np.ndarray, np.moveaxis(array @ matrix.T, -1, axis).astype(dtype))


def thick_slices(volume: Array, axis: int, sr: SuperResolutionConfig) -> Array:
    """The thick-slice volume measured from the thin ``volume`` along ``axis`` (any number of axes)."""
    return _along(profile_weights(volume.shape[axis], sr), volume, axis)


def upsample(thick: Array, axis: int, factor: int, thin_slices: int | None = None, order: int = 1) -> Array:
    """``thick`` interpolated onto its thin grid along ``axis``: linear (``order`` 1) or cubic B-spline (3).

    Args:
        thick: the thick-slice volume (numpy or torch).
        axis: its through-plane axis.
        factor: thin slices per thick slice.
        thin_slices: length of the thin axis (default ``factor`` x the thick one; longer holds the edge).
        order: 1 linear, 3 cubic B-spline.
    """
    length = thin_slices if thin_slices is not None else thick.shape[axis] * factor
    if order == 1:
        return _along(linear_weights(thick.shape[axis], factor, length), thick, axis)
    if order != 3:
        raise ValueError(f"upsample order {order}: use 1 (linear) or 3 (cubic B-spline)")
    from scipy.ndimage import map_coordinates

    array = thick.detach().cpu().numpy() if isinstance(thick, torch.Tensor) else np.asarray(thick)
    grid = [np.arange(s, dtype=np.float64) for s in array.shape]
    grid[axis] = np.clip(thin_positions(length, factor), 0.0, array.shape[axis] - 1)  # edges held, as linear
    coordinates = np.stack(np.meshgrid(*grid, indexing="ij"))
    out = map_coordinates(array.astype(np.float64), coordinates, order=3, mode="nearest").astype(np.float32)
    return torch.from_numpy(out) if isinstance(thick, torch.Tensor) else out


def _grid_change(axis: int, factor: int) -> np.ndarray:
    """``S``: thick voxel coordinates to thin voxel coordinates along ``axis`` of a 3D grid."""
    change = np.eye(4)
    change[axis, axis] = factor
    change[axis, 3] = (factor - 1) / 2.0
    return change


def thick_affine(affine: Sequence[Sequence[float]] | np.ndarray, axis: int, factor: int) -> np.ndarray:
    """The voxel-to-world matrix of the thick volume measured from a thin volume with ``affine``."""
    return np.asarray(affine, dtype=np.float64) @ _grid_change(axis, factor)


def thin_affine(affine: Sequence[Sequence[float]] | np.ndarray, axis: int, factor: int) -> np.ndarray:
    """The voxel-to-world matrix of the thin grid a thick volume with ``affine`` was measured on."""
    return np.asarray(affine, dtype=np.float64) @ np.linalg.inv(_grid_change(axis, factor))


def simulate_thick(volume: np.ndarray, affine: np.ndarray, axis: int,
                   sr: SuperResolutionConfig) -> tuple[np.ndarray, np.ndarray]:
    """A thick-slice acquisition of a thin 3D ``volume`` (X, Y, Z) and its voxel-to-world matrix.

    Args:
        volume: the thin (isotropic) volume, spatial axes only.
        affine: its 4x4 voxel-to-world matrix.
        axis: the through-plane axis of ``volume``.
        sr: factor, slice profile and gap.
    """
    if volume.ndim != 3:
        raise ValueError(f"simulate_thick takes a 3D volume (X, Y, Z); got shape {volume.shape}")
    return np.asarray(thick_slices(volume, axis, sr)), thick_affine(affine, axis, sr.factor)


__all__ = ["linear_weights", "profile_weights", "simulate_thick", "thick_affine", "thick_slice_count",
           "thick_slices", "thin_affine", "thin_positions", "upsample"]
