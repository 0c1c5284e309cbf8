"""MONAI's ``Spacingd`` for a large scan, resampled a slab of output rows at a time.

``Spacingd`` casts the whole scan to float32 and samples it through a dense grid of output
coordinates: for a 512x512x1000 CT resampled to 1.5 mm that is the 1 GB float32 copy of the
int16 scan, a 0.9 GB grid and the output at once, more than the whole prediction may hold.
Here MONAI plans the resampling (``Spacingd(lazy=True)``: the output grid and the transform record,
nothing resampled), and MONAI's ``SpatialResample`` then fills the output a slab of rows along the
first spatial axis at a time, each from the float32 copy of only the input rows it reads. The
record is pushed as MONAI's own lazy resampling pushes it, so ``Invertd`` inverts the result.

A slab's sampling coordinates are computed from its own corner, so values agree with the
whole-volume resampling to float rounding, not bitwise; a scan whose float32 copy is small
(:data:`WHOLE_BYTES`) is resampled whole by ``Spacingd`` itself, bitwise as in training.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Spacingd, SpatialResample
from monai.transforms.lazy.utils import kwargs_from_pending
from monai.utils import LazyAttr

#: A scan whose float32 copy is at most this is resampled whole (MONAI's ``Spacingd``, bitwise).
WHOLE_BYTES = 256 << 20
#: Output voxels of one slab: its grid (3 float32 a voxel), its values and its input rows stay small.
SLAB_VOXELS = 1 << 22


class SlabSpacingd(MapTransform, InvertibleTransform):
    """``Spacingd(keys, pixdim, mode="bilinear", dtype=float32)`` for one image key, slab by slab
    where the scan is large (see the module docstring). One ``Spacingd`` plans and records both
    ways, so its ``inverse`` (``Invertd``) finds its own record."""

    def __init__(self, keys: Any, pixdim: Any):
        super().__init__(keys)
        self.spacing = Spacingd(keys=keys, pixdim=pixdim, mode="bilinear", dtype=np.float32)

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if 4 * image.numel() <= WHOLE_BYTES or not isinstance(image, MetaTensor):
                d[key] = self.spacing({key: image})[key]
                continue
            self.spacing.lazy = True  # the output grid and the record only
            try:
                planned = cast(MetaTensor, self.spacing({key: image})[key])
            finally:
                self.spacing.lazy = False
            d[key] = resample_in_slabs(planned) if planned.has_pending_operations else self.spacing({key: image})[key]
        return d

    def inverse(self, data: Any) -> Any:
        return self.spacing.inverse(data)


def _slab_rows(image: MetaTensor, xform: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The input rows along the first axis that output rows ``[start, stop)`` read (one more on each
    side than the interpolation needs, so no sample of a slab meets its edge)."""
    rows = int(image.shape[1])
    ends = [xform[0, 0] * i + xform[0, -1] for i in (start, stop - 1)]
    return max(0, math.floor(min(ends)) - 1), min(rows, math.ceil(max(ends)) + 2)


def resample_in_slabs(planned: MetaTensor, slab_voxels: int = SLAB_VOXELS) -> MetaTensor:
    """Carry out ``planned``'s one pending ``Spacingd`` a slab of output rows at a time (first spatial
    axis), each slab by MONAI's ``SpatialResample`` from the input rows it reads, cast to float32 there.

    Raises:
        ValueError: more than one pending operation, or a resampling that mixes the first axis with
            the others (a slab of output rows would read every input row).
    """
    pending = list(planned.pending_operations)
    if len(pending) != 1:
        raise ValueError(f"resample_in_slabs: expected one pending Spacingd, got {len(pending)} pending operations")
    shape = tuple(int(s) for s in planned.peek_pending_shape())
    dst = np.asarray(planned.peek_pending_affine(), dtype=np.float64)
    src = np.asarray(planned.affine, dtype=np.float64)
    xform = np.linalg.solve(src, dst)  # output voxel -> input voxel
    dims = len(shape)
    if np.abs(xform[0, 1:dims]).max(initial=0) > 1e-6 or np.abs(xform[1:dims, 0]).max(initial=0) > 1e-6:
        raise ValueError("resample_in_slabs: the resampling mixes the first axis with the others")
    options = kwargs_from_pending(pending[0])
    resampler = SpatialResample(mode=options.get(LazyAttr.INTERP_MODE) or "bilinear",
                                padding_mode=options.get(LazyAttr.PADDING_MODE) or "border",
                                align_corners=bool(options.get(LazyAttr.ALIGN_CORNERS)), dtype=np.float32)
    source = planned.as_tensor()
    out = _longest_axis_outermost(int(planned.shape[0]), shape)
    step = max(1, slab_voxels // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        lo, hi = _slab_rows(planned, xform, start, stop)
        shift_in, shift_out = np.eye(dims + 1), np.eye(dims + 1)
        shift_in[0, -1], shift_out[0, -1] = lo, start
        rows = MetaTensor(source[:, lo:hi].to(torch.float32), affine=torch.as_tensor(src @ shift_in))
        slab = resampler(rows, dst_affine=torch.as_tensor(dst @ shift_out), spatial_size=(stop - start, *shape[1:]))
        out[:, start:stop] = torch.as_tensor(slab)
    meta = {**planned.meta, "affine": torch.as_tensor(dst, dtype=planned.affine.dtype)}
    result = MetaTensor(out, meta=meta, applied_operations=list(planned.applied_operations))
    for op in pending:  # as MONAI's apply_pending records a lazy resampling it carries out
        result.push_applied_operation(op)
    return result


def _longest_axis_outermost(channels: int, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 (channels, *shape) volume laid out with its longest spatial axis outermost in
    memory (a permuted view): the axis a bounded sweep takes for a long scan (the smallest plane), whose
    passed rows are then whole runs of memory it can hand back as it goes
    (:func:`~medseg.tasks.segmentation.bounded.row_releaser`)."""
    longest = max(range(len(shape)), key=lambda a: (shape[a], -a))
    if longest == 0:
        return torch.empty((channels, *shape), dtype=torch.float32)
    others = [a for a in range(len(shape)) if a != longest]
    stored = torch.empty((channels, shape[longest], *(shape[a] for a in others)), dtype=torch.float32)
    order = [0] + [1 + (0 if a == longest else 1 + others.index(a)) for a in range(len(shape))]
    return stored.permute(order)
