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

import math
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
    """Input-grid labels (and probabilities) made from network-grid slabs, or parts of slabs, as a
    sweep gives them out.

    A sweep cut along a second network axis (``band``; :class:`~medseg.engine.sliding._BandAccumulator`)
    gives a row of its slabs out in tiles, band by band. An input slice is then made tile by tile:
    the input voxels whose interpolation ends (its upper neighbour) in the tile, from the tile and
    what it keeps of the tile before it (its last band column) and of the row before (its last
    slice). Each voxel's interpolation is the same elementwise steps either way, so whether the
    slabs come whole or in tiles, only the slices held differ.

    Args:
        mapping: ``inv(network affine) @ input affine`` (see :func:`axis_map`).
        net_shape: the network grid's spatial shape.
        native_shape: the input's spatial shape.
        axis: the network axis the sweep runs along.
        band: the network axis tiles are cut along (default: the first other axis; whole slabs are one
            tile each, spanning it).
    """

    def __init__(self, mapping: np.ndarray, net_shape: tuple[int, ...], native_shape: tuple[int, ...], axis: int,
                 band: int | None = None):
        dims = len(net_shape)
        self.net_shape, self.native_shape, self.axis = net_shape, native_shape, axis
        self.band = band if band is not None else min(a for a in range(dims) if a != axis)
        linear = mapping[:dims, :dims]
        #: for each input axis j, the network axis it runs along
        self.target = [int(np.argmax(np.abs(linear[:, j]))) for j in range(dims)]
        self.native_axis = self.target.index(axis)
        self.native_band = self.target.index(self.band)
        #: network-grid position of every input index, per input axis (clamped: border padding)
        self.coords = [np.clip(linear[self.target[j], j] * np.arange(native_shape[j]) + mapping[self.target[j], dims],
                               0.0, net_shape[self.target[j]] - 1) for j in range(dims)]
        position = self.coords[self.native_axis]
        self.low = np.floor(position).astype(np.int64)
        self.high = np.minimum(self.low + 1, net_shape[axis] - 1)
        self.pending = sorted(range(native_shape[self.native_axis]), key=lambda k: (self.high[k], k))
        #: per input axis but the swept one: the network neighbours below and above, and the weight
        self.steps = {j: self._steps(j) for j in range(dims) if j != self.native_axis}
        self.rest = [a for a in range(dims) if a != axis]  # the network axes of a slice, in order
        self.next = 0  # the first pending slice of the tile now coming in
        self.row_first = 0  # ... and of the row of tiles now coming in
        self.tile: tuple[int, int] | None = None
        self.held: dict[int, torch.Tensor] = {}  # this tile's slices still needed
        self.halo: dict[int, torch.Tensor] = {}  # the last band column of the tile before, per slice
        self.edge: dict[int, torch.Tensor] = {}  # this tile's last band column, per slice
        self.previous: tuple[int, torch.Tensor] | None = None  # the row before's last slice, whole
        self.row_plane: tuple[int, torch.Tensor] | None = None  # this row's last slice, as its tiles close
        self.row_last: tuple[int, torch.Tensor] | None = None  # this tile's last slice so far
        self.written = 0
        self.labels: torch.Tensor | None = None
        self.probabilities: torch.Tensor | None = None
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.keep = False

    def _steps(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.from_numpy(self.coords[j]).to(torch.float32)
        low = position.floor().long()
        high = (low + 1).clamp(max=self.net_shape[self.target[j]] - 1)
        return low, high, position - low.float()

    @classmethod
    def for_volume(cls, volume: MetaTensor, axis: int, band: int | None = None) -> SlabResampler:
        """The resampler of a preprocessed volume back to the grid it was read on.

        Raises:
            CaseError: the model's resampling mixes axes (no slab-by-slab inverse).
        """
        native_shape = tuple(int(s) for s in volume.meta["spatial_shape"])
        mapping = axis_map(np.asarray(volume.affine), np.asarray(volume.meta["original_affine"]))
        if mapping is None:
            raise CaseError(f"{volume.meta.get('filename_or_obj', 'image')}: the model's resampling mixes the "
                            "image's axes, so it cannot be inverted slab by slab; set MEDSEG_PREDICT_SCORES=full")
        return cls(mapping, tuple(int(s) for s in volume.shape[1:]), native_shape, axis, band)

    def start(self, decode: Callable[[torch.Tensor], torch.Tensor], keep_probabilities: bool, classes: int) -> None:
        """Get ready for a sweep: how a slice's probabilities become labels, and whether to keep them."""
        self.decode, self.keep = decode, keep_probabilities
        # every input voxel is made (finish() checks): pages touched only as slices are written
        self.labels = torch.empty(self.native_shape, dtype=torch.uint8 if classes < 256 else torch.int32)
        if keep_probabilities:
            self.probabilities = torch.empty((classes, *self.native_shape), dtype=torch.float32)

    def add(self, start: int, stop: int, probabilities: torch.Tensor, band_start: int | None = None,
            band_stop: int | None = None) -> None:
        """Take the network slab ``[start, stop)`` (or its part ``[band_start, band_stop)`` along the
        band) and make every input voxel it completes."""
        if self.labels is None:
            raise CaseError("SlabResampler.add before start(): call start() with the decoding first")
        tile = (0, self.net_shape[self.band]) if band_start is None else (int(band_start), int(band_stop or 0))
        if tile != self.tile:
            self._next_tile(tile)
        dim = self.rest.index(self.band) + 1  # the band's dimension in a slice (channels first)
        for i in range(start, stop):
            plane = probabilities.select(1 + self.axis, i - start)
            self.held[i] = plane
            if band_start is not None:  # a copy: a view would keep the whole piece
                self.edge[i] = plane.narrow(dim, plane.shape[dim] - 1, 1).clone()
            self.row_last = (i, plane)
        while self.next < len(self.pending) and self.high[self.pending[self.next]] < stop:
            self._make(self.pending[self.next], tile)
            self.next += 1
        needed = min((int(self.low[k]) for k in self.pending[self.next:]), default=stop)
        for i in [i for i in self.held if i < needed]:
            del self.held[i]

    def _next_tile(self, tile: tuple[int, int]) -> None:
        """Close the tile that came in before ``tile``: its last slice goes into the row's last slice
        (for the next row), its last band column is kept for the next tile of the row; a tile at the
        band's start begins a new row."""
        dim = self.rest.index(self.band) + 1
        if self.tile is not None and self.row_last is not None:
            z, plane = self.row_last
            if self.row_plane is None:
                shape = list(plane.shape)
                shape[dim] = self.net_shape[self.band]
                self.row_plane = (z, torch.empty(shape, dtype=plane.dtype))
            self.row_plane[1].narrow(dim, self.tile[0], self.tile[1] - self.tile[0]).copy_(plane)
        if tile[0] == 0:  # a new row: the pending slices go on from where the last row's tiles stopped
            self.previous, self.row_plane = self.row_plane, None
            self.row_first, self.halo = self.next, {}
        else:
            self.halo = self.edge
        self.edge, self.held, self.row_last, self.tile = {}, {}, None, tile
        self.next = self.row_first

    def _slice(self, i: int, tile: tuple[int, int]) -> torch.Tensor:
        """Network slice ``i`` over the tile and the column before it."""
        dim = self.rest.index(self.band) + 1
        first = max(tile[0] - 1, 0)
        if i in self.held:
            part = self.held[i]
            return torch.cat([self.halo[i], part], dim=dim) if tile[0] > 0 else part
        previous = self.previous
        if previous is None or previous[0] != i:
            raise CaseError(f"slab resampling: network slice {i} is needed but no longer held (a bug; kept loud)")
        return previous[1].narrow(dim, first, tile[1] - first)

    def _make(self, k: int, tile: tuple[int, int]) -> None:
        """Input slice ``k`` along the swept input axis, where its voxels' upper band neighbour lies in
        ``tile``: interpolated along each axis in turn (the swept one first), decoded, stored."""
        low_b, high_b, weight_b = self.steps[self.native_band]
        inside = torch.nonzero((high_b >= tile[0]) & (high_b < tile[1])).flatten()
        if inside.numel() == 0:
            return
        first = max(tile[0] - 1, 0)
        lo, hi = int(self.low[k]), int(self.high[k])
        t = float(self.coords[self.native_axis][k] - lo)
        plane = self._slice(lo, tile)
        if hi != lo and t != 0.0:
            plane = torch.lerp(plane, self._slice(hi, tile), t)
        # plane: (K, *network axes but the swept one), the band cut to the tile; each remaining axis in turn
        for j, (low, high, weight) in self.steps.items():
            dim = 1 + self.rest.index(self.target[j])
            if j == self.native_band:
                low, high, weight = low[inside] - first, high[inside] - first, weight[inside]
            weight = weight.view([-1 if d == dim else 1 for d in range(plane.ndim)])
            plane = torch.lerp(plane.index_select(dim, low), plane.index_select(dim, high), weight)
        # the plane's axes follow the network's order; put them in the input's order
        native_order = [j for j in range(len(self.native_shape)) if j != self.native_axis]
        plane = plane.permute(0, *[1 + self.rest.index(self.target[j]) for j in native_order])
        if self.labels is None or self.decode is None:
            raise CaseError("SlabResampler: start() was not called before the sweep")
        where = native_order.index(self.native_band)
        whole = inside.numel() == self.native_shape[self.native_band]
        labels = self.labels.select(self.native_axis, k)
        decoded = self.decode(plane)
        if whole:
            labels.copy_(decoded)
        else:
            labels.index_copy_(where, inside, decoded.to(labels.dtype))
        if self.probabilities is not None:
            kept = self.probabilities.select(1 + self.native_axis, k)
            if whole:
                kept.copy_(plane)
            else:
                kept.index_copy_(1 + where, inside, plane.contiguous())
        self.written += decoded.numel()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input-grid labels and (if kept) probabilities, once the sweep is done.

        Raises:
            CaseError: the sweep ended before every input slice could be made (a bug; kept loud).
        """
        if self.labels is None or self.written != math.prod(self.native_shape):
            raise CaseError(f"slab resampling ended with {math.prod(self.native_shape) - self.written} input voxels "
                            "not made")
        return self.labels, self.probabilities
