"""Test-time augmentation and ensembles: one axis convention, one average, for every task.

Flips are named by *spatial* axis (0 = the first spatial axis), whatever leading batch or
channel dimensions a tensor has: :func:`flip_spatial` maps them onto the tensor's last
``spatial_dims`` dimensions. nnU-Net's mirroring is every non-empty combination of axes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Member = TypeVar("Member")
SpatialAxes = tuple[int, ...]


def flip_combinations(spatial_dims: int, tta: bool) -> list[SpatialAxes]:
    """``[()]`` without TTA; with it, also every non-empty set of spatial axes (7 flips in 3D)."""
    flips = [combo for r in range(1, spatial_dims + 1) for combo in itertools.combinations(range(spatial_dims), r)]
    return [(), *flips] if tta else [()]


def flip_spatial(x: torch.Tensor, axes: SpatialAxes, spatial_dims: int) -> torch.Tensor:
    """``x`` flipped along spatial ``axes``; its last ``spatial_dims`` dimensions are the spatial ones."""
    if not axes:
        return x
    lead = x.ndim - spatial_dims
    return x.flip([lead + a for a in axes])


def average_predictions(members: Sequence[Member], image: torch.Tensor, spatial_dims: int, tta: bool,
                        predict: Callable[[Member, torch.Tensor], torch.Tensor],
                        spatial_output: bool = True) -> torch.Tensor:
    """The mean of ``predict(member, flipped image)`` over every ensemble member and flip.

    Args:
        members: the ensemble (one network, or the folds/seeds of a run).
        image: the input, spatial axes last.
        spatial_dims: how many of ``image``'s trailing dimensions are spatial.
        tta: also average over every axis flip.
        predict: probabilities (or images) for one member and one (flipped) input.
        spatial_output: the output has the input's spatial axes (a mask's probabilities), so each
            is flipped back before averaging; False for per-image outputs (class probabilities).
    """
    total: torch.Tensor | None = None
    count = 0
    for member in members:
        for axes in flip_combinations(spatial_dims, tta):
            out = predict(member, flip_spatial(image, axes, spatial_dims))
            if spatial_output:
                out = flip_spatial(out, axes, spatial_dims)
            total = out if total is None else total.add_(out)  # each output is a fresh tensor
            count += 1
    if total is None:
        raise ValueError("average_predictions: no ensemble members given")
    return total.div_(count)
