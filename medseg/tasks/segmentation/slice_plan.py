"""nnU-Net's ``2d`` configuration, as a race candidate for anisotropic scans.

nnU-Net plans a 2D U-Net beside the 3D one for every 3D dataset and keeps whichever cross-validates
better; on thick-slice scans (prostate, many CTs) the 2D network often wins, because a 3D patch
there holds few slices and the through-plane context it buys is blurred. medseg builds the 2D
network as a 3D DynUNet one slice thick: kernels and strides 1 along the thick axis, so every
convolution is in-plane, the patch is ``[..., 1, ...]`` and MONAI's sliding window walks the slices.
The data path, augmentation, inference and the model's contract stay the 3D ones, so the
candidate is an ordinary config and the race can compare it on the held-out fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.planning import rules
from medseg.planning.plan import Candidate

#: nnU-Net's 2D networks start at 32 features: a slice is cheap, so the width costs little.
BASE_FEATURES = 32
#: Slices a step: nnU-Net's 2D batches are 12 or more on a GPU; on a CPU a slice costs a fraction of a
#: 3D patch, so a few more slices keep a step's time near the 3D one's.
BATCH_SIZE = 8


def slice_topology(spacing: Sequence[float], median_shape: Sequence[float], thick_axis: int) -> rules.Topology:
    """The in-plane U-Net of nnU-Net's 2D plan (the median slice, below the median image so crops
    move) with the thick axis put back at one voxel, kernel 1 and stride 1 at every stage."""
    in_plane = [a for a in range(len(spacing)) if a != thick_axis]
    plane_spacing = [spacing[a] for a in in_plane]
    plane_median = [median_shape[a] for a in in_plane]
    plane = rules.pool_and_conv(plane_spacing, [int(np.ceil(m)) for m in plane_median])
    plane = rules.leave_crop_room(plane_spacing, plane, plane_median)

    def with_thick(values: Sequence[int], thick: int) -> list[int]:
        out = list(values)
        out.insert(thick_axis, thick)
        return out

    return rules.Topology(kernels=[with_thick(k, 1) for k in plane.kernels],
                          strides=[with_thick(s, 1) for s in plane.strides],
                          patch=with_thick(plane.patch, 1), pools_per_axis=with_thick(plane.pools_per_axis, 0))


def slice_network(topology: rules.Topology) -> dict[str, Any]:
    """The DynUNet config of :func:`slice_topology` (per-axis strides at every stage)."""
    features = [min(BASE_FEATURES * 2**i, rules.NNUNET_MAX_FEATURES[2]) for i in range(topology.stages)]
    return {"name": "dynunet", "spatial_dims": 3, "channels": features, "strides": [list(s) for s in topology.strides[1:]],
            "kernels": topology.kernels, "num_res_units": 0, "norm": "instance"}


def slice_candidate(spacing: Sequence[float], shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]],
                    thick_axis: int | None) -> Candidate | None:
    """nnU-Net's 2D configuration as a race candidate, for 3D data with a thick axis (None otherwise)."""
    if thick_axis is None or len(spacing) != 3:
        return None
    median_shape = list(np.median(np.asarray(shapes) * np.asarray(spacings) / np.asarray(spacing), axis=0))
    topology = slice_topology(spacing, median_shape, thick_axis)
    if min(p for a, p in enumerate(topology.patch) if a != thick_axis) < 8 or topology.stages < 3:
        return None  # slices too small for a U-Net worth racing
    network = slice_network(topology)
    plane = "x".join(str(p) for p in topology.patch)
    label = f"2D U-Net over slices ({BASE_FEATURES} base features, patch {topology.patch})"
    return Candidate(f"2d{BASE_FEATURES}-{plane}", f"{label}: nnU-Net's 2d configuration, raced because axis "
                     f"{thick_axis} is thick", {"model": network, "patch.size": topology.patch,
                                               "train.batch_size": BATCH_SIZE},
                     {"model": f"{label}: it beat the 3D network on the held-out fold (nnU-Net keeps whichever "
                               "configuration cross-validates better)",
                      "patch.size": f"one slice thick along axis {thick_axis}, the median slice in-plane",
                      "train.batch_size": f"{BATCH_SIZE} slices a step: a slice costs a fraction of a 3D patch"})
