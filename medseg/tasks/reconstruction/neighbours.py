"""2.5D super-resolution input: each slice with its neighbours as channels.

A 2D network over sagittal slices sees the thick (S) axis of one slice only; the slices on either
side hold the same structures a voxel away, and their interpolated thick slices carry information
the centre one lacks. With ``recon.sr.context`` = k the network's input for slice ``i`` is the
interpolated slices ``i - k ... i + k`` (channel ``k`` is slice ``i`` itself) and it restores slice
``i`` alone. At the volume's edges the first and last slice stand in for the missing neighbours
(edge replication), in training as in evaluation and ``predict``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple


def neighbour_channels(slices: torch.Tensor, context: int) -> torch.Tensor:
    """Consecutive slices (S, 1, H, W) of one volume as (S, 2 context + 1, H, W): channel ``c`` of
    slice ``i`` is slice ``clamp(i + c - context, 0, S - 1)``.

    Raises:
        ValueError: ``slices`` is not a one-channel slice stack, or ``context`` is negative.
    """
    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"neighbour_channels takes one-channel slices (S, 1, H, W); got shape {tuple(slices.shape)}")
    if context < 0:
        raise ValueError(f"recon.sr.context {context}: the number of neighbours on each side must be 0 or more")
    if context == 0:
        return slices
    count = slices.shape[0]
    offsets = torch.arange(-context, context + 1)
    index = (torch.arange(count)[:, None] + offsets[None]).clamp(0, count - 1)  # (S, 2 context + 1)
    return slices[:, 0][index]


class NeighboursAsChannelsd(MapTransform):
    """A training crop of ``2 context + 1`` slices (1, H, W, 2 context + 1), slice axis last: the
    input key's slices become channels (2 context + 1, H, W) and the target keeps its centre slice (1, H, W).

    Args:
        context: neighbours on each side.
        inputs: the interpolated thick slices (the network's input).
        targets: the truth (its centre slice is the target).
    """

    def __init__(self, context: int, inputs: KeysCollection, targets: KeysCollection):
        super().__init__([*self._keys(inputs), *self._keys(targets)])
        self.context = context
        self.inputs = self._keys(inputs)
        self.targets = self._keys(targets)

    @staticmethod
    def _keys(keys: KeysCollection) -> list[Hashable]:
        return list(ensure_tuple(keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        depth = 2 * self.context + 1
        for key in [*self.inputs, *self.targets]:
            if d[key].ndim != 4 or d[key].shape[0] != 1 or d[key].shape[-1] != depth:
                raise ValueError(f"{key}: a 2.5D training crop is (1, H, W, {depth}) at recon.sr.context "
                                 f"{self.context}; got shape {tuple(d[key].shape)}")
        for key in self.inputs:
            d[key] = torch.movedim(torch.as_tensor(d[key])[0], -1, 0)
        for key in self.targets:
            d[key] = torch.as_tensor(d[key])[..., self.context]
        return d


__all__ = ["NeighboursAsChannelsd", "neighbour_channels"]
