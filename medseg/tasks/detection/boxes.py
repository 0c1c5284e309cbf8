"""Boxes: what detection learns and predicts, in one image's voxel grid or in world millimetres.

Convention (MONAI's, :mod:`monai.data.box_utils` ``StandardMode``: ``xyxy`` in 2D, ``xyzxyz`` in
3D): a voxel box is ``(start_0, ..., start_d, end_0, ..., end_d)`` in array index order, ``end``
exclusive, as a slice is: the box of a component covering voxels 3..5 along an axis is
``(3, 6)``, which is what ``monai.apps.detection``'s ``convert_mask_to_box`` gives too.

An affine maps voxel *centres* (NIfTI, ITK), so the physical extent of voxels ``start..end-1``
reaches from ``affine @ (start - 0.5)`` to ``affine @ (end - 0.5)``. World boxes (mm, in the frame
medseg's readers give affines in: RAS) are the axis-aligned boxes that enclose those extents;
under an oblique affine (a rotated grid) the box grows to enclose the rotated one, both ways.
MONAI's ``AffineBoxToWorldCoordinated`` maps the index corners without that half voxel: its
world boxes are shifted by half a voxel against the image, which is why medseg does not use it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy import ndimage

from medseg.errors import ImageValueError, ManifestError

#: (N, 2 * dims) float64 boxes: starts then ends, array index order.
BoxArray = np.ndarray
#: How far (voxels) a box may reach past the image before it is refused, not clipped: rounding
#: of world coordinates written by other tools.
OUTSIDE_TOLERANCE_VOXELS = 1.0


@dataclass(frozen=True)
class Boxes:
    """Boxes of one image in its voxel grid (MONAI standard mode), their classes and, for
    predictions, their scores.

    Attributes:
        corners: ``(N, 2 * dims)`` float64, starts then ends (end exclusive).
        classes: ``(N,)`` int64 class values (the label value, or the box file's class).
        scores: ``(N,)`` float64 confidences of predicted boxes; None for reference boxes.
    """

    corners: BoxArray
    classes: np.ndarray
    scores: np.ndarray | None = None

    @property
    def dims(self) -> int:
        return int(self.corners.shape[1] // 2)

    def __len__(self) -> int:
        return int(self.corners.shape[0])

    @staticmethod
    def empty(dims: int) -> Boxes:
        return Boxes(np.zeros((0, 2 * dims)), np.zeros(0, dtype=np.int64))


def spatial_affine(affine: np.ndarray, dims: int) -> np.ndarray:
    """The ``(dims + 1) x (dims + 1)`` affine of a ``dims``-D grid; a 2D image's 4 x 4 affine (as
    MONAI keeps it) gives its first two axes.

    Raises:
        ValueError: an affine of another shape.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (dims + 1, dims + 1):
        return affine
    if dims == 2 and affine.shape == (4, 4):
        return affine[np.ix_([0, 1, 3], [0, 1, 3])]
    raise ValueError(f"affine of shape {affine.shape} for {dims}D boxes: expected ({dims + 1}, {dims + 1})")


def _corner_points(corners: BoxArray) -> np.ndarray:
    """``(N, 2**dims, dims)``: every corner point of every box."""
    dims = corners.shape[1] // 2
    starts, ends = corners[:, :dims], corners[:, dims:]
    picks = np.array(list(product((0, 1), repeat=dims)), dtype=bool)  # (2**dims, dims)
    return np.where(picks[None], ends[:, None, :], starts[:, None, :])


def _enclosing(points: np.ndarray) -> BoxArray:
    return np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)


def voxel_to_world(corners: BoxArray, affine: np.ndarray) -> BoxArray:
    """World boxes (mm) enclosing the physical extent of voxel boxes.

    Args:
        corners: ``(N, 2 * dims)`` voxel boxes (end exclusive).
        affine: voxel centre -> world mm, ``(dims + 1)`` square (or 4 x 4 for 2D).

    Returns:
        ``(N, 2 * dims)`` world boxes: minimum then maximum coordinate per world axis.
    """
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, np.shape(corners)[-1] if np.ndim(corners) else 0)
    dims = corners.shape[1] // 2
    if len(corners) == 0:
        return np.zeros((0, 2 * dims))
    a = spatial_affine(affine, dims)
    points = _corner_points(corners) - 0.5  # voxel edges, in centre coordinates
    world = points @ a[:dims, :dims].T + a[:dims, dims]
    return _enclosing(world)


def world_to_voxel(corners_mm: BoxArray, affine: np.ndarray) -> BoxArray:
    """Voxel boxes (end exclusive, fractional) enclosing world boxes; the inverse of
    :func:`voxel_to_world` for grids aligned with the world axes (any spacing, flips, order).

    Args:
        corners_mm: ``(N, 2 * dims)`` world boxes, minimum then maximum coordinate per axis.
        affine: voxel centre -> world mm of the grid the boxes go to.
    """
    corners_mm = np.asarray(corners_mm, dtype=np.float64)
    dims = corners_mm.shape[1] // 2
    if len(corners_mm) == 0:
        return np.zeros((0, 2 * dims))
    inverse = np.linalg.inv(spatial_affine(affine, dims))
    voxels = _corner_points(corners_mm) @ inverse[:dims, :dims].T + inverse[:dims, dims]
    return _enclosing(voxels + 0.5)


def boxes_from_label(label: np.ndarray, spacing_volume: float, min_volume_mm3: float = 0.0,
                     classes: Sequence[int] | None = None, source: str = "<label>") -> Boxes:
    """One box per connected component of each class of a label map (scipy's face connectivity).

    Args:
        label: ``(*spatial)`` integer label map (a leading channel of 1 is dropped).
        spacing_volume: volume of one voxel in mm³ (area in mm² for 2D): ``|det|`` of the affine.
        min_volume_mm3: components smaller than this are not lesions (noise, partial voxels).
        classes: the label values to box; None: every non-zero value present.
        source: the file, for messages.

    Returns:
        The boxes, ordered by class then position; empty for an empty label map (a negative case).

    Raises:
        ImageValueError: the label map has foreground but every component is below
            ``min_volume_mm3`` (the minimum is wrong for these data), or holds non-integer values.
    """
    label = np.asarray(label)
    if label.ndim in (3, 4) and label.shape[0] == 1:
        label = label[0]
    if np.issubdtype(label.dtype, np.floating):
        if not np.array_equal(label, np.round(label)):
            raise ImageValueError(f"{source}: Expected a label map of integer class values. Got fractional values "
                                  f"(e.g. {label[label != np.round(label)].ravel()[0]:.3g}). Resample label maps "
                                  "with nearest-neighbour interpolation.")
    dims = label.ndim
    values = [int(v) for v in np.unique(label) if v != 0] if classes is None else [int(c) for c in classes]
    found, kept, smallest = 0, [], np.inf
    for value in values:
        components, count = ndimage.label(label == value)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:] * spacing_volume
        found += count
        smallest = min(smallest, float(sizes.min()))
        for index, region in enumerate(ndimage.find_objects(components)):
            if region is not None and sizes[index] >= min_volume_mm3:
                kept.append([*(s.start for s in region), *(s.stop for s in region), value])
    if found and not kept:
        raise ImageValueError(
            f"{source}: Expected at least one component of at least {min_volume_mm3:g} mm³ (boxes.min_volume_mm3). "
            f"Got {found} component(s), the largest below it (smallest {smallest:.3g} mm³). Lower "
            "boxes.min_volume_mm3, or check that this is the right label map.")
    if not kept:
        return Boxes.empty(dims)
    table = np.asarray(kept, dtype=np.float64)
    return Boxes(table[:, :-1], table[:, -1].astype(np.int64))


def check_boxes(corners: BoxArray, shape: Sequence[int], source: str, what: str = "box") -> BoxArray:
    """Voxel boxes checked against their image, clipped to it within
    :data:`OUTSIDE_TOLERANCE_VOXELS`.

    Args:
        corners: ``(N, 2 * dims)`` voxel boxes.
        shape: the image's spatial shape.
        source: the file (and case) the boxes came from, for messages.
        what: how a message names one box (``box 3 of case_007``).

    Raises:
        ManifestError: a non-finite coordinate, a box of zero or negative size on an axis
            (degenerate), or one reaching outside the image by more than the tolerance.
    """
    corners = np.asarray(corners, dtype=np.float64)
    dims = len(shape)
    if corners.ndim != 2 or corners.shape[1] != 2 * dims:
        raise ManifestError(f"{source}: Expected {dims}D boxes of {2 * dims} coordinates. Got an array of shape "
                            f"{corners.shape}. Give one start and one end per image axis.")
    size = np.asarray(shape, dtype=np.float64)
    for index, box in enumerate(corners):
        check_box_values(box, source, f"{what} {index}")
        starts, ends = box[:dims], box[dims:]
        if (starts < -OUTSIDE_TOLERANCE_VOXELS).any() or (ends > size + OUTSIDE_TOLERANCE_VOXELS).any():
            raise ManifestError(
                f"{source}: {what} {index}: Expected a box inside the image (0..{list(shape)} voxels). Got voxels "
                f"{_fmt(starts)}..{_fmt(ends)}. Check the coordinates' frame (boxes.frame: ras or lps, world mm or "
                "voxel indices) and that the box belongs to this image.")
    return np.concatenate([np.clip(corners[:, :dims], 0, size), np.clip(corners[:, dims:], 0, size)], axis=1)


def check_box_values(box: np.ndarray, source: str, name: str) -> None:
    """One box's coordinates are finite and its size positive on every axis (in any frame).

    Raises:
        ManifestError: a non-finite coordinate, or a degenerate box (end at or before start).
    """
    dims = len(box) // 2
    if not np.isfinite(box).all():
        raise ManifestError(f"{source}: {name}: Expected finite coordinates. Got {np.asarray(box).tolist()}. Fill "
                            "the missing values or drop the box.")
    starts, ends = box[:dims], box[dims:]
    if (ends <= starts).any():
        axis = int(np.argmax(ends <= starts))
        raise ManifestError(f"{source}: {name}: Expected a box with positive size on every axis. Got start "
                            f"{starts[axis]:g} and end {ends[axis]:g} on axis {axis} (a degenerate box). A "
                            "one-voxel box runs from i to i + 1; a world box from its minimum to its maximum.")


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
