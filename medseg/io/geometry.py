"""Geometry of a volume (shape, spacing, origin, direction) from its RAS affine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor

Spacing = tuple[float, ...]


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray  # columns: unit vectors of the voxel axes in RAS world space

    def to_json(self) -> dict[str, list[float] | list[int]]:
        return {
            "shape": list(self.shape),
            "spacing": [float(v) for v in self.spacing],
            "origin": [float(v) for v in self.origin],
            "direction": [float(v) for v in self.direction.ravel()],
        }


def geometry_from_affine(affine: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> Geometry:
    """Split a (d+1)x(d+1) voxel-to-world affine into spacing, origin and direction cosines."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    d = a.shape[0] - 1
    linear = a[:d, :d]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / np.where(spacing == 0, 1.0, spacing)
    return Geometry(tuple(int(s) for s in shape), spacing, a[:d, d].copy(), direction)


def geometry_of(volume: MetaTensor) -> Geometry:
    """Geometry of a channel-first ``MetaTensor``."""
    return geometry_from_affine(volume.affine, tuple(volume.shape[1:]))
