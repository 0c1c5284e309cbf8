"""Probabilities on the network's grid back onto the input's grid, one input slice at a time.

A model with a target spacing predicts on a resampled grid; the full-buffer path inverts the
whole probability volume (MONAI ``Invertd``: ``Spacingd``'s inverse, then ``Orientationd``'s) and
takes the arg-max. Here, as the bounded sweep finishes network slabs, every input slice whose
interpolation they cover is made at once: the network-grid position of each of its voxels
(``inv(network affine) @ input affine``), linear interpolation along each axis with the border
value beyond the grid (``Spacingd``'s ``border`` padding), its labels, and its probabilities
where kept. Only the network slices a pending input slice still needs are held.

Orientation and spacing keep the axes apart (a permutation with flips and scales), so the map is
separable; a model whose resampling mixes axes is left to the full-buffer path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.errors import CaseError


def resamples(contract: dict[str, Any]) -> bool:
    """Whether a model's preprocessing resamples the scan (a target spacing in its contract)."""
    return bool(contract.get("spacing"))


def axis_map(network_affine: np.ndarray, native_affine: np.ndarray, tol: float = 1e-4) -> np.ndarray | None:
    """``inv(network) @ native``: input voxel -> network-grid position, when it moves each input
    axis along one network axis (None when it mixes them)."""
    m = np.linalg.solve(np.asarray(network_affine, dtype=np.float64), np.asarray(native_affine, dtype=np.float64))
    dims = m.shape[0] - 1
    linear = m[:dims, :dims]
    big = np.abs(linear) > tol * np.abs(linear).max()
    if not (big.sum(0) == 1).all() or not (big.sum(1) == 1).all():
        return None
    return m


class SlabResampler:
    """Input-grid labels (and probabilities) made from network-grid slabs as a sweep gives them out.

    Args:
        mapping: ``inv(network affine) @ input affine`` (see :func:`axis_map`).
        net_shape: the network grid's spatial shape.
        native_shape: the input's spatial shape.
        axis: the network axis the sweep runs along.
    """

    def __init__(self, mapping: np.ndarray, net_shape: tuple[int, ...], native_shape: tuple[int, ...], axis: int):
        dims = len(net_shape)
        self.net_shape, self.native_shape, self.axis = net_shape, native_shape, axis
        linear = mapping[:dims, :dims]
        #: for each input axis j, the network axis it runs along
        self.target = [int(np.argmax(np.abs(linear[:, j]))) for j in range(dims)]
        self.native_axis = self.target.index(axis)
        #: network-grid position of every input index, per input axis (clamped: border padding)
        self.coords = [np.clip(linear[self.target[j], j] * np.arange(native_shape[j]) + mapping[self.target[j], dims],
                               0.0, net_shape[self.target[j]] - 1) for j in range(dims)]
        position = self.coords[self.native_axis]
        self.low = np.floor(position).astype(np.int64)
        self.high = np.minimum(self.low + 1, net_shape[axis] - 1)
        self.pending = sorted(range(native_shape[self.native_axis]), key=lambda k: (self.high[k], k))
        self.next = 0
        self.held: dict[int, torch.Tensor] = {}
        self.labels: torch.Tensor | None = None
        self.probabilities: torch.Tensor | None = None
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.keep = False

    @classmethod
    def for_volume(cls, volume: MetaTensor, axis: int) -> SlabResampler:
        """The resampler of a preprocessed volume back to the grid it was read on.

        Raises:
            CaseError: the model's resampling mixes axes (no slab-by-slab inverse).
        """
        native_shape = tuple(int(s) for s in volume.meta["spatial_shape"])
        mapping = axis_map(np.asarray(volume.affine), np.asarray(volume.meta["original_affine"]))
        if mapping is None:
            raise CaseError(f"{volume.meta.get('filename_or_obj', 'image')}: the model's resampling mixes the "
                            "image's axes, so it cannot be inverted slab by slab; set MEDSEG_PREDICT_SCORES=full")
        return cls(mapping, tuple(int(s) for s in volume.shape[1:]), native_shape, axis)

    def start(self, decode: Callable[[torch.Tensor], torch.Tensor], keep_probabilities: bool, classes: int) -> None:
        """Get ready for a sweep: how a slice's probabilities become labels, and whether to keep them."""
        self.decode, self.keep = decode, keep_probabilities
        # every input slice is made (finish() checks): pages touched only as slices are written
        self.labels = torch.empty(self.native_shape, dtype=torch.uint8 if classes < 256 else torch.int32)
        if keep_probabilities:
            self.probabilities = torch.empty((classes, *self.native_shape), dtype=torch.float32)

    def add(self, start: int, stop: int, probabilities: torch.Tensor) -> None:
        """Take the network slab ``[start, stop)`` and make every input slice it completes."""
        if self.labels is None:  # the first slab: its channels say how many classes there are
            raise CaseError("SlabResampler.add before start(): call start() with the decoding first")
        for i in range(start, stop):
            self.held[i] = probabilities.select(1 + self.axis, i - start)
        while self.next < len(self.pending) and self.high[self.pending[self.next]] < stop:
            self._make(self.pending[self.next])
            self.next += 1
        needed = min((int(self.low[k]) for k in self.pending[self.next:]), default=stop)
        for i in [i for i in self.held if i < needed]:
            del self.held[i]

    def _make(self, k: int) -> None:
        """Input slice ``k`` along the swept input axis: interpolated, decoded, stored."""
        lo, hi = int(self.low[k]), int(self.high[k])
        t = float(self.coords[self.native_axis][k] - lo)
        plane = self.held[lo] if hi == lo or t == 0.0 else torch.lerp(self.held[lo], self.held[hi], t)
        # plane: (K, *network axes but the swept one); interpolate along each remaining axis
        rest = [a for a in range(len(self.net_shape)) if a != self.axis]
        for j in range(len(self.native_shape)):
            if j == self.native_axis:
                continue
            dim = 1 + rest.index(self.target[j])
            position = torch.from_numpy(self.coords[j]).to(torch.float32)
            low = position.floor().long()
            high = (low + 1).clamp(max=self.net_shape[self.target[j]] - 1)
            weight = (position - low.float()).view([-1 if d == dim else 1 for d in range(plane.ndim)])
            a, b = plane.index_select(dim, low), plane.index_select(dim, high)
            plane = torch.lerp(a, b, weight)
        # the plane's axes follow the network's order; put them in the input's order
        native_order = [j for j in range(len(self.native_shape)) if j != self.native_axis]
        plane = plane.permute(0, *[1 + rest.index(self.target[j]) for j in native_order])
        if self.labels is None or self.decode is None:
            raise CaseError("SlabResampler: start() was not called before the sweep")
        self.labels.select(self.native_axis, k).copy_(self.decode(plane))
        if self.probabilities is not None:
            self.probabilities.select(1 + self.native_axis, k).copy_(plane)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input-grid labels and (if kept) probabilities, once the sweep is done.

        Raises:
            CaseError: the sweep ended before every input slice could be made (a bug; kept loud).
        """
        if self.labels is None or self.next < len(self.pending):
            raise CaseError(f"slab resampling ended with {len(self.pending) - self.next} input slices not made")
        return self.labels, self.probabilities
