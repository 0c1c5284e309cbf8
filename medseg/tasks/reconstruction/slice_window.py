"""The sliding window that slice-wise image-to-image networks (super-resolution, translation) predict
with: each slice through MONAI's ``sliding_window_inference`` at the network's training size."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.engine.runtime import autocast

#: Overlap of neighbouring windows (Gaussian-blended): the slices are a few windows wide at most.
WINDOW_OVERLAP = 0.25


def slice_window(roi: Sequence[int], batch_size: int, amp_dtype: torch.dtype | None,
                 device: torch.device) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``window(member, slices)``: one network's output over a batch of slices, window by window of
    ``roi`` (the form :mod:`medseg.engine.tta` calls each ensemble member and flip with)."""

    def window(member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        def run(patch: torch.Tensor) -> torch.Tensor:
            with autocast(amp_dtype, device):
                return member(patch).float()

        return torch.as_tensor(sliding_window_inference(x, list(roi), batch_size, run, overlap=WINDOW_OVERLAP,
                                                        mode="gaussian"))

    return window
