"""Test-time augmentation and ensembles: one axis convention, one average, for every task.

Flips are named by *spatial* axis (0 = the first spatial axis), whatever leading batch or
channel dimensions a tensor has: :func:`flip_spatial` maps them onto the tensor's last
``spatial_dims`` dimensions. nnU-Net's mirroring is every non-empty combination of axes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class Samples:
    """The average of every (member, flip) prediction, and what uncertainty is measured from.

    Attributes:
        mean: the average (what :func:`average_predictions` returns).
        count: how many predictions were averaged (members × flips).
        labels: each prediction's most likely class (argmax over ``class_axis``), when kept.
        variance: the variance between predictions, summed over classes, when kept (same layout
            as one class of ``mean``).
    """

    mean: torch.Tensor
    count: int
    labels: list[torch.Tensor] = field(default_factory=list)
    variance: torch.Tensor | None = None


def predict_samples(members: Sequence[Member], image: torch.Tensor, spatial_dims: int, tta: bool,
                    predict: Callable[[Member, torch.Tensor], torch.Tensor], spatial_output: bool = True,
                    keep_spread: bool = False, class_axis: int = 0) -> Samples:
    """Predict with every ensemble member and flip, and average (one code path for TTA and ensembles).

    Args:
        members: the ensemble (one network, or the folds/seeds of a run).
        image: the input, spatial axes last.
        spatial_dims: how many of ``image``'s trailing dimensions are spatial.
        tta: also average over every axis flip.
        predict: probabilities (or images) for one member and one (flipped) input.
        spatial_output: the output has the input's spatial axes (a mask's probabilities), so each
            is flipped back before averaging; False for per-image outputs (class probabilities).
        keep_spread: also keep each prediction's argmax and the variance between predictions
            (a running sum of squares: one more output's memory, not one per prediction).
        class_axis: the class axis of each output, for the argmax.
    """
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    labels: list[torch.Tensor] = []
    count = 0
    for member in members:
        for axes in flip_combinations(spatial_dims, tta):
            out = predict(member, flip_spatial(image, axes, spatial_dims))
            if spatial_output:
                out = flip_spatial(out, axes, spatial_dims)
            if keep_spread:
                labels.append(out.argmax(class_axis).to(torch.uint8 if out.shape[class_axis] < 256 else torch.int32))
                squares = out.square() if squares is None else squares.add_(out.square())
            total = out if total is None else total.add_(out)  # each output is a fresh tensor
            count += 1
    if total is None:
        raise ValueError("average_predictions: no ensemble members given")
    mean = total.div_(count)
    variance = None
    if squares is not None:
        variance = squares.div_(count).sub_(mean.square()).clamp_(min=0).sum(class_axis)
    return Samples(mean, count, labels, variance)


def average_predictions(members: Sequence[Member], image: torch.Tensor, spatial_dims: int, tta: bool,
                        predict: Callable[[Member, torch.Tensor], torch.Tensor],
                        spatial_output: bool = True) -> torch.Tensor:
    """The mean of ``predict(member, flipped image)`` over every ensemble member and flip
    (:func:`predict_samples` without the spread)."""
    return predict_samples(members, image, spatial_dims, tta, predict, spatial_output).mean
