"""Masked image modelling: blank random blocks of a patch, and score the network's fill-in.

The masking is a MONAI random dictionary transform, so the engine's sample stream seeds it like
every other augmentation (a resumed run draws the same masks). It hands the loop the usual
``image``/``label`` pair: ``image`` is the masked patch, ``label`` the original patch with the mask
as one more channel, which is all :class:`MaskedReconstructionLoss` needs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from torch import nn

IMAGE, LABEL = "image", "label"


class RandBlockMaskd(Randomizable, MapTransform):
    """Blank a random ``ratio`` of the ``block``-sized cells of a channel-first patch (value 0, the
    mean after z-scoring) and keep the original and the mask as the reconstruction target.

    Args:
        block: cell size in voxels per spatial axis; edge cells are cut to the patch.
        ratio: fraction of the cells masked (rounded, at least one, never all).
    """

    def __init__(self, block: Sequence[int], ratio: float):
        MapTransform.__init__(self, keys=[IMAGE])
        self.block = tuple(int(b) for b in block)
        self.ratio = float(ratio)
        self._cells: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        self._cells = self._draw(tuple(int(g) for g in data))

    def _draw(self, grid: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(grid))
        masked = min(count - 1, max(1, round(self.ratio * count))) if count > 1 else 1
        cells = np.zeros(count, dtype=bool)
        cells[self.R.permutation(count)[:masked]] = True
        return cells.reshape(grid)

    def mask_for(self, spatial: Sequence[int]) -> torch.Tensor:
        """A fresh voxel mask (1 = masked) for a patch of ``spatial`` size."""
        voxels = self._cells = self._draw(tuple(math.ceil(s / b) for s, b in zip(spatial, self.block)))
        for axis, size in enumerate(self.block):
            voxels = np.repeat(voxels, size, axis=axis)
        return torch.from_numpy(voxels[tuple(slice(0, s) for s in spatial)].astype(np.float32))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = torch.as_tensor(d[IMAGE]).float()
        mask = self.mask_for(image.shape[1:])
        d[IMAGE] = image * (1.0 - mask)
        d[LABEL] = torch.cat([image, mask[None]])
        return d


class MaskedReconstructionLoss(nn.Module):
    """Mean L1 or L2 error of the network's output on the masked voxels only (the visible ones are
    given away by the input). ``target`` is :class:`RandBlockMaskd`'s label: the channels, then the mask."""

    def __init__(self, kind: str = "l1"):
        super().__init__()
        self.kind = kind

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = target.shape[1] - 1
        original, mask = target[:, :channels].float(), target[:, channels:].float()
        diff = output.float() - original
        error = diff.abs() if self.kind == "l1" else diff * diff
        return (error * mask).sum() / (mask.sum() * channels).clamp(min=1.0)
