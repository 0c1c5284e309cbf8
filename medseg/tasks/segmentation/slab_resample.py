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
from collections.abc import Callable, Sequence
from typing import Any, cast

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

    A sweep cut along other network axes too (``bands``; :class:`~medseg.engine.sliding._BandAccumulator`)
    gives a row of its slabs out in tiles, each after the tiles before it along each band. An input
    slice is then made tile by tile: the input voxels whose interpolation ends (their upper neighbour
    along each band) in the tile, from the tile extended by one network voxel before it along each band
    (the last slab the tile before it along that band kept for it) and, along the sweep, the last
    slice of the row before. Each voxel's interpolation is the same elementwise steps either way, so
    whether the slabs come whole or in tiles, only what is held differs.

    Args:
        mapping: ``inv(network affine) @ input affine`` (see :func:`axis_map`).
        net_shape: the network grid's spatial shape.
        native_shape: the input's spatial shape.
        axis: the network axis the sweep runs along.
        bands: the network axes tiles are cut along (default: whole slabs, one tile each).
    """

    def __init__(self, mapping: np.ndarray, net_shape: tuple[int, ...], native_shape: tuple[int, ...], axis: int,
                 bands: Sequence[int] = ()):
        dims = len(net_shape)
        self.net_shape, self.native_shape, self.axis = net_shape, native_shape, axis
        self.rest = [a for a in range(dims) if a != axis]  # the network axes of a slice, in order
        self.bands = tuple(bands) or (self.rest[0],)
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
        #: the lowest network slice any pending slice from here on reads (a suffix minimum, looked up per piece)
        self.needed = np.minimum.accumulate(self.low[self.pending][::-1])[::-1] if self.pending else self.low
        #: per input axis but the swept one: the network neighbours below and above, and the weight
        self.steps = {j: self._steps(j) for j in range(dims) if j != self.native_axis}
        self.next = 0  # the first pending slice of the tile now coming in
        self.row_first = 0  # ... and of the row of tiles now coming in
        self.tile: tuple[tuple[int, int], ...] | None = None
        self.held: dict[int, torch.Tensor] = {}  # this tile's slices (extended) still needed
        #: (band index, the tile's band starts) -> slice -> the last slab kept for that tile by the one before it
        self.halos: dict[tuple[int, tuple[int, ...]], dict[int, torch.Tensor]] = {}
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

    def _dim(self, net_axis: int) -> int:
        """Where a network axis lies in a slice (channels first)."""
        return 1 + self.rest.index(net_axis)

    @classmethod
    def for_volume(cls, volume: MetaTensor, axis: int, bands: Sequence[int] = ()) -> SlabResampler:
        """The resampler of a preprocessed volume back to the grid it was read on.

        Raises:
            CaseError: the model's resampling mixes axes (no slab-by-slab inverse).
        """
        native_shape = tuple(int(s) for s in volume.meta["spatial_shape"])
        mapping = axis_map(np.asarray(volume.affine), np.asarray(volume.meta["original_affine"]))
        if mapping is None:
            raise CaseError(f"{volume.meta.get('filename_or_obj', 'image')}: the model's resampling mixes the "
                            "image's axes, so it cannot be inverted slab by slab; set MEDSEG_PREDICT_SCORES=full")
        return cls(mapping, tuple(int(s) for s in volume.shape[1:]), native_shape, axis, bands)

    def start(self, decode: Callable[[torch.Tensor], torch.Tensor], keep_probabilities: bool, classes: int) -> None:
        """Get ready for a sweep: how a slice's probabilities become labels, and whether to keep them."""
        self.decode, self.keep = decode, keep_probabilities
        # every input voxel is made (finish() checks): pages touched only as slices are written
        self.labels = torch.empty(self.native_shape, dtype=torch.uint8 if classes < 256 else torch.int32)
        if keep_probabilities:
            self.probabilities = torch.empty((classes, *self.native_shape), dtype=torch.float32)

    def add(self, start: int, stop: int, probabilities: torch.Tensor,
            ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """Take the network slab ``[start, stop)`` (or its tile over ``ranges`` along the bands) and
        make every input voxel it completes."""
        if self.labels is None:
            raise CaseError("SlabResampler.add before start(): call start() with the decoding first")
        tile = tuple((0, self.net_shape[b]) for b in self.bands) if ranges is None else tuple(
            (int(lo), int(hi)) for lo, hi in ranges)
        if tile != self.tile:
            self._next_tile(tile)
        for i in range(start, stop):
            core = probabilities.select(1 + self.axis, i - start)
            self.held[i] = self._extend(i, core, tile)
            self._keep_halos(i, self.held[i], tile)
            self.row_last = (i, core)
        while self.next < len(self.pending) and self.high[self.pending[self.next]] < stop:
            self._make(self.pending[self.next], tile)
            self.next += 1
        needed = int(self.needed[self.next]) if self.next < len(self.pending) else stop
        for i in [i for i in self.held if i < needed]:
            del self.held[i]

    def _extend(self, i: int, core: torch.Tensor, tile: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Slice ``i`` of a tile with the network voxel before it along each band (from the halos the
        tiles before it kept): the last band first, so an earlier band's halo spans the later ones'."""
        starts = tuple(lo for lo, _ in tile)
        for m in reversed(range(len(self.bands))):
            if tile[m][0] > 0:
                core = torch.cat([self.halos[(m, starts)][i], core], dim=self._dim(self.bands[m]))
        return core

    def _keep_halos(self, i: int, extended: torch.Tensor, tile: tuple[tuple[int, int], ...]) -> None:
        """The last slab along each band of slice ``i`` of a tile, for the tile after it along that band
        (over the tile itself along earlier bands, extended along later ones, as :meth:`_extend` wants it;
        a copy: a view would keep the whole piece)."""
        starts = [lo for lo, _ in tile]
        for m, (_, hi) in enumerate(tile):
            if hi >= self.net_shape[self.bands[m]]:
                continue
            part = extended
            for e in range(m):
                if tile[e][0] > 0:
                    part = part.narrow(self._dim(self.bands[e]), 1, tile[e][1] - tile[e][0])
            dim = self._dim(self.bands[m])
            key = (m, tuple(starts[:m] + [hi] + starts[m + 1:]))
            self.halos.setdefault(key, {})[i] = part.narrow(dim, part.shape[dim] - 1, 1).clone()

    def _next_tile(self, tile: tuple[tuple[int, int], ...]) -> None:
        """Close the tile that came in before ``tile``: its last slice goes into the row's last slice
        (for the next row), the halos kept for it are dropped; a tile at every band's start begins a
        new row."""
        if self.tile is not None and self.row_last is not None:
            z, core = self.row_last
            if self.row_plane is None:
                shape = list(core.shape)
                for b in self.bands:
                    shape[self._dim(b)] = self.net_shape[b]
                self.row_plane = (z, torch.empty(shape, dtype=core.dtype))
            target = self.row_plane[1]
            for b, (lo, hi) in zip(self.bands, self.tile):
                target = target.narrow(self._dim(b), lo, hi - lo)
            target.copy_(core)
            for m in range(len(self.bands)):
                self.halos.pop((m, tuple(lo for lo, _ in self.tile)), None)
        if all(lo == 0 for lo, _ in tile):  # a new row: the pending slices go on from where the last row's stopped
            self.previous, self.row_plane = self.row_plane, None
            self.row_first = self.next
        self.held, self.row_last, self.tile = {}, None, tile
        self.next = self.row_first

    def _slice(self, i: int, tile: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Network slice ``i`` over the tile and the voxel before it along each band."""
        if i in self.held:
            return self.held[i]
        if self.previous is None or self.previous[0] != i:
            raise CaseError(f"slab resampling: network slice {i} is needed but no longer held (a bug; kept loud)")
        plane = self.previous[1]
        for b, (lo, hi) in zip(self.bands, tile):
            first = max(lo - 1, 0)
            plane = plane.narrow(self._dim(b), first, hi - first)
        return plane

    def _make(self, k: int, tile: tuple[tuple[int, int], ...]) -> None:
        """Input slice ``k`` along the swept input axis, where its voxels' upper neighbours along the bands
        lie in ``tile``: interpolated along each axis in turn (the swept one first), decoded, stored."""
        chosen: dict[int, tuple[torch.Tensor, int]] = {}  # input axis -> (its indices in the tile, first)
        for b, (lo, hi) in zip(self.bands, tile):
            j = self.target.index(b)
            high = self.steps[j][1]
            chosen[j] = (torch.nonzero((high >= lo) & (high < hi)).flatten(), max(lo - 1, 0))
            if chosen[j][0].numel() == 0:
                return
        lo_z, hi_z = int(self.low[k]), int(self.high[k])
        t = float(self.coords[self.native_axis][k] - lo_z)
        plane = self._slice(lo_z, tile)
        if hi_z != lo_z and t != 0.0:
            plane = _lerp(plane, self._slice(hi_z, tile), t)
        # plane: (K, *network axes but the swept one); each remaining axis in turn, in the input's order
        for j, (low, high, weight) in self.steps.items():
            dim = self._dim(self.target[j])
            if j in chosen:
                inside, first = chosen[j]
                low, high, weight = low[inside] - first, high[inside] - first, weight[inside]
            weight = weight.view([-1 if d == dim else 1 for d in range(plane.ndim)])
            plane = _lerp(plane.index_select(dim, low), plane.index_select(dim, high), weight)
        native_order = [j for j in range(len(self.native_shape)) if j != self.native_axis]
        plane = plane.permute(0, *[self._dim(self.target[j]) for j in native_order])
        self._store(k, plane, [chosen[j][0] if j in chosen and chosen[j][0].numel() < self.native_shape[j]
                               else None for j in native_order])

    def _store(self, k: int, plane: torch.Tensor, indices: list[torch.Tensor | None]) -> None:
        """Decode ``plane`` (K, the tile's voxels of input slice ``k``, in the input's order) and write its
        labels (and probabilities) where ``indices`` say (None: the whole axis)."""
        if self.labels is None or self.decode is None:
            raise CaseError("SlabResampler: start() was not called before the sweep")
        decoded = self.decode(plane)
        where: list[Any] = [slice(None)] * len(indices)
        picked = [n for n, ix in enumerate(indices) if ix is not None]
        for n in picked:  # broadcast against each other: the block of the picked indices
            shape = [1] * len(picked)
            shape[picked.index(n)] = -1
            where[n] = cast(torch.Tensor, indices[n]).view(shape)
        labels = self.labels.select(self.native_axis, k)
        if picked:
            labels[tuple(where)] = decoded.to(labels.dtype)
        else:
            labels.copy_(decoded)
        if self.probabilities is not None:
            self.probabilities.select(1 + self.native_axis, k)[(slice(None), *where)] = plane
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


def _lerp(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """``a + (b - a) * weight`` in three elementwise steps, each rounded once: ``torch.lerp``'s vector body
    and scalar tail round differently (a fused multiply-add), so a voxel's value would depend on where
    it falls in a tile; this way a tile's voxels are bitwise the whole slab's."""
    return b.sub(a).mul_(weight).add_(a)
