"""Super-resolving a real thick-slice volume: its thin grid, and the network over it.

``medseg predict --measured`` with a super-resolution model: the input already is a thick-slice
scan. Its through-plane axis (the model's ``recon.sr.axis`` after the contract's orientation,
found in the file's own voxel order) is interpolated linearly onto the thin grid the slices were
measured on (:func:`~medseg.tasks.reconstruction.slice_profile.thin_affine`), exactly as the
training inputs were made; the network then runs over the slices that cross that axis with
MONAI's sliding window, so a slice larger than the network's training size goes through whole.
With ``--tta`` the output is the mean over the in-plane flips the model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from nibabel.orientations import axcodes2ornt, io_orientation
from torch import nn

from medseg.engine.tta import average_predictions
from medseg.errors import CaseError
from medseg.tasks.reconstruction.config import SuperResolutionConfig
from medseg.tasks.reconstruction.neighbours import neighbour_channels
from medseg.tasks.reconstruction.slice_profile import thin_affine, upsample
from medseg.tasks.reconstruction.slice_window import slice_window


def file_axis(affine: np.ndarray, orientation: str | None, oriented_axis: int) -> int:
    """The voxel axis of a file with ``affine`` that becomes axis ``oriented_axis`` once the volume
    is oriented to ``orientation`` (None: the file's own order is kept)."""
    if not orientation:
        return oriented_axis
    world_axis = int(axcodes2ornt(tuple(orientation))[oriented_axis][0])
    file_to_world = io_orientation(np.asarray(affine, dtype=np.float64))
    return int(np.flatnonzero(file_to_world[:, 0] == world_axis)[0])


def to_thin_grid(volume: MetaTensor, orientation: str | None, sr: SuperResolutionConfig, source: str) -> MetaTensor:
    """A channel-first thick-slice volume (1, X, Y, Z) linearly interpolated onto its thin grid,
    with that grid's affine (and as its ``original_affine``: the outputs are written on it).

    Raises:
        CaseError: not a single-channel 3D volume, or too few slices along the thick axis.
    """
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise CaseError(f"{source}: super-resolution takes a single-channel 3D volume; got shape "
                        f"{tuple(volume.shape)}. Give one grey thick-slice volume per file")
    affine = np.asarray(volume.affine, dtype=np.float64)
    axis = file_axis(affine, orientation, sr.axis)
    if volume.shape[1 + axis] < 2:
        raise CaseError(f"{source}: expected at least 2 slices along the through-plane axis (voxel axis {axis}), "
                        f"got {volume.shape[1 + axis]}; is it a single slice?")
    thin = upsample(volume.as_tensor().float(), 1 + axis, sr.factor)
    grid = thin_affine(affine, axis, sr.factor)
    meta = {k: v for k, v in dict(volume.meta).items() if k != "affine"}
    meta.update({"original_affine": grid, "spatial_shape": np.asarray(thin.shape[1:]), "original_channel_dim": 0})
    return MetaTensor(thin, affine=torch.as_tensor(grid), meta=meta)


@torch.no_grad()
def restore_slices(net: nn.Module, volume: torch.Tensor, roi: tuple[int, int], device: torch.device,
                   amp_dtype: torch.dtype | None, batch_size: int = 16, context: int = 0, tta: bool = False,
                   axes: Sequence[int] | None = None) -> torch.Tensor:
    """The network's output (S, 1, H, W) over the slices of ``volume`` (1, H, W, S), each by MONAI's
    sliding window of the network's training size ``roi`` (Gaussian-blended, ``WINDOW_OVERLAP``),
    with ``context`` neighbours on each side as channels (2.5D, ``recon.sr.context``).

    Args:
        tta: also average over in-plane flips of the slices (medseg's one TTA convention,
            :mod:`medseg.engine.tta`, as translation does): each flipped slice goes through the
            sliding window whole and its output is flipped back. The neighbours (channels) flip
            with their slice; the slice axis itself is never flipped.
        axes: the in-plane axes TTA may flip (0: H, 1: W; the contract's ``tta_axes``, those the
            training augmentation flipped); None: both.
    """
    net.eval()
    slices = neighbour_channels(volume.float()[0].permute(2, 0, 1)[:, None], context)

    window = slice_window(roi, batch_size, amp_dtype, device)

    outputs = [average_predictions([net], slices[start:start + batch_size].to(device), 2, tta, window, axes=axes).cpu()
               for start in range(0, len(slices), batch_size)]
    return torch.cat(outputs)


__all__ = ["file_axis", "restore_slices", "to_thin_grid"]
