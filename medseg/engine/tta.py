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


def flip_combinations(spatial_dims: int, tta: bool, axes: Sequence[int] | None = None) -> list[SpatialAxes]:
    """``[()]`` without TTA; with it, also every non-empty set of ``axes`` (default: every spatial
    axis, 7 flips in 3D)."""
    pool = list(range(spatial_dims)) if axes is None else sorted(set(axes))
    flips = [combo for r in range(1, len(pool) + 1) for combo in itertools.combinations(pool, r)]
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
        labels: each prediction's label map (its argmax over ``class_axis``, or what ``decode``
            made of it), when kept.
        variance: the variance between predictions, summed over classes, when kept (same layout
            as one class of ``mean``).
    """

    mean: torch.Tensor
    count: int
    labels: list[torch.Tensor] = field(default_factory=list)
    variance: torch.Tensor | None = None


def predict_samples(members: Sequence[Member], image: torch.Tensor, spatial_dims: int, tta: bool,
                    predict: Callable[[Member, torch.Tensor], torch.Tensor], spatial_output: bool = True,
                    keep_spread: bool = False, class_axis: int = 0, axes: Sequence[int] | None = None,
                    decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Samples:
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
        axes: the spatial axes TTA may flip (the model's ``tta_axes``); None: all of them.
        decode: each prediction's label map for the spread, where the argmax is not it (a region
            model's sigmoids are decoded by threshold and paint order).
    """
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    labels: list[torch.Tensor] = []
    count = 0
    for member in members:
        for flip in flip_combinations(spatial_dims, tta, axes):
            out = predict(member, flip_spatial(image, flip, spatial_dims))
            if spatial_output:
                out = flip_spatial(out, flip, spatial_dims)
            if keep_spread:
                labels.append(decode(out) if decode is not None else
                              out.argmax(class_axis).to(torch.uint8 if out.shape[class_axis] < 256 else torch.int32))
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
                        spatial_output: bool = True, axes: Sequence[int] | None = None) -> torch.Tensor:
    """The mean of ``predict(member, flipped image)`` over every ensemble member and flip
    (:func:`predict_samples` without the spread)."""
    return predict_samples(members, image, spatial_dims, tta, predict, spatial_output, axes=axes).mean


def tta_axes(contract: dict, tta: bool, source: str) -> list[int] | None:
    """The flips TTA may use for a model: its contract's ``tta_axes`` (None for models from before
    medseg recorded them: every axis, as then).

    Raises:
        PredictOptionError: TTA asked for a model whose training flipped no axis.
    """
    from medseg.errors import PredictOptionError

    axes = contract.get("tta_axes")
    if tta and axes is not None and not axes:
        raise PredictOptionError(
            f"--tta: {source} was trained without flip augmentation (its config's augment has no flip), so a "
            "mirrored scan is outside what it learned and averaging over mirrorings would hurt its predictions "
            "(benchmarks/results/uncertainty.md measures it on MSD hippocampus). Leave --tta out, or train with "
            "augment: [{name: flip}] to use it.")
    return None if axes is None else [int(a) for a in axes]
