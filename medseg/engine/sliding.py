"""Sliding-window prediction shared by validation, evaluation and batch inference."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.engine.runtime import autocast


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], *, overlap: float = 0.5,
                   sw_batch_size: int = 4, blend: str = "gaussian", device: torch.device | None = None,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits for one channel-first volume (C, *spatial) -> (K, *spatial), Gaussian-blended windows.

    Windows run on ``device``; stitching stays on the volume's own device (CPU for big scans).
    """
    device = device or next(model.parameters()).device
    batch = image.unsqueeze(0)
    with autocast(amp_dtype, device):
        logits = sliding_window_inference(
            batch, roi_size=list(roi_size), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap,
            mode=blend, sw_device=device, device=batch.device,
        )
    return logits[0].float()


def label_map(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(0)`` as uint8 for channel-first (K, *spatial) scores, first maximum on ties.

    torch's argmax over the leading dimension of a contiguous volume walks it with a stride of the
    whole volume, which is far slower on large volumes than these K-1 elementwise passes (timings
    in benchmarks/results/predict.md; tests/engine/test_sliding.py checks they agree).
    """
    if scores.shape[0] > 255:
        return scores.argmax(0)
    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    for k in range(1, scores.shape[0]):
        better = scores[k] > best
        labels.masked_fill_(better, k)
        torch.maximum(best, scores[k], out=best)
    return labels


def class_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the class axis (0) of ``logits / temperature``, as float32, whose value at a
    voxel does not depend on where that voxel sits in the tensor.

    ``torch.softmax`` over a leading axis vectorises from the start of each thread's share and
    finishes with a scalar tail, which rounds differently, and its class sum changes order with
    the alignment: the same voxel gets a different last bit in a slab than in the whole volume.
    Here every step is elementwise (maximum, exp, a class-by-class sum, division), so a slab's
    probabilities are bitwise the whole volume's (tests/engine/test_sliding.py).
    """
    scores = logits.float() / temperature
    scores -= scores.amax(0, keepdim=True)
    scores.exp_()
    total = scores[0].clone()
    for k in range(1, scores.shape[0]):
        total += scores[k]
    return scores.div_(total)


def class_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits)`` as float32, elementwise in one rounding wherever a voxel sits (``torch.sigmoid``'s
    vectorised body and scalar tail differ in the last bit now and then)."""
    return torch.exp(-logits.float()).add_(1.0).reciprocal_()


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every eval-mode batch norm that follows a convolution into that convolution's weights
    (``torch.nn.utils.fusion``), in place: one pass over each activation fewer per layer, the same
    outputs up to float rounding. MONAI's ``Convolution`` blocks (conv, then norm/dropout/activation)
    are what the U-Nets are built of; other modules are left as they are. For inference only."""
    from monai.networks.blocks import Convolution
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batch_norms: the model is in training mode; its batch norms still learn")
    for block in model.modules():
        adn = getattr(block, "adn", None)  # absent when the block is conv_only
        if not isinstance(block, Convolution) or not isinstance(adn, nn.Module):
            continue
        norm = getattr(adn, "N", None)
        conv = getattr(block, "conv", None)
        first = next(iter(adn.named_children()), ("", None))[0]
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and first == "N" \
                and isinstance(conv, nn.modules.conv._ConvNd) and norm.track_running_stats:  # norm right after conv
            block.conv = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
            adn.N = nn.Identity()
    return model


# ------------------------------------------------------------------------------- slab by slab

#: A finished slab of a volume along the sweep axis: ``(start, stop, scores)``, the scores
#: channel-first with the slab's extent ``stop - start`` along that axis.
Slab = tuple[int, int, torch.Tensor]
#: A finished part of a slab (see ``bands`` in :func:`stream_logits`): ``(start, stop, ranges, scores)``,
#: ``ranges`` its ``(start, stop)`` along each band axis, the scores channel-first with those extents
#: (and ``stop - start`` along the sweep axis).
Tile = tuple[int, int, tuple[tuple[int, int], ...], torch.Tensor]
#: The most a finished piece of a sweep holds (bytes): a finished run of slices is given out in
#: pieces of this size, so the work done on each (averaging, labels, entropy) stays this small.
PIECE_BYTES = 8 << 20


@dataclass(frozen=True)
class WindowGrid:
    """MONAI's sliding-window layout of one volume (``sliding_window_inference``'s own helpers):
    the padded size, the padding, and the windows in the order they run.

    Attributes:
        size: the spatial size the windows cover (the volume, padded where it is smaller than the patch).
        pad: ``torch.nn.functional.pad``'s argument for that padding (last axis first), as MONAI pads.
        offset: where the volume starts inside the padded size, per axis.
        windows: each window's slices; MONAI's order (first axis slowest) stably sorted by their
            start along ``axis``, which leaves MONAI's order unchanged for ``axis`` 0.
        axis: the spatial axis the windows sweep.
        shape: the volume's own spatial size.
    """

    size: tuple[int, ...]
    pad: tuple[int, ...]
    offset: tuple[int, ...]
    windows: tuple[tuple[slice, ...], ...]
    axis: int
    shape: tuple[int, ...]

    @classmethod
    def of(cls, spatial: Sequence[int], roi_size: Sequence[int], overlap: float, axis: int = 0) -> WindowGrid:
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        dims = len(spatial)
        roi = tuple(int(r) for r in roi_size)
        size = tuple(max(int(s), r) for s, r in zip(spatial, roi))
        pad: list[int] = []
        for d in reversed(range(dims)):  # F.pad's order, as sliding_window_inference builds it
            diff = max(roi[d] - int(spatial[d]), 0)
            pad.extend([diff // 2, diff - diff // 2])
        offset = tuple(max(roi[d] - int(spatial[d]), 0) // 2 for d in range(dims))
        scan = _get_scan_interval(size, roi, dims, (overlap,) * dims)
        slices = dense_patch_slices(size, roi, scan, return_slice=True)
        ordered = sorted(slices, key=lambda s: s[axis].start)  # stable: MONAI's order between equal starts
        return cls(size, tuple(pad), offset, tuple(tuple(s) for s in ordered), axis, tuple(int(s) for s in spatial))

    def span(self, window: int) -> tuple[int, int]:
        """Where window ``window`` starts and stops along the sweep axis (padded coordinates)."""
        s = self.windows[window][self.axis]
        return int(s.start), int(s.stop)


@torch.no_grad()
def stream_logits(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], *, overlap: float = 0.5,
                  sw_batch_size: int = 4, blend: str = "gaussian", device: torch.device | None = None,
                  amp_dtype: torch.dtype | None = None, axis: int = 0,
                  window: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  passed: Callable[[int], None] | None = None, bands: Sequence[int] = ()) -> Iterator[Slab | Tile]:
    """:func:`predict_logits` one slab at a time along spatial ``axis``: each slab is given out as
    soon as no later window touches it, so only about one patch's thickness of the volume's scores
    is held at once.

    The windows, their batches, the Gaussian weights and every addition are MONAI's, in MONAI's
    order along ``axis`` 0; there every slab is bitwise what :func:`predict_logits` gives for it
    (tests/engine/test_sliding.py). Along another axis the windows run in another order, so the
    float sums agree only to rounding.

    ``window``: a voxel-wise map the image still needs (a CT window deferred by the preprocessing,
    :func:`medseg.data.transforms.window_function`), applied to each batch of windows as it is cut
    out, so the image is held in its stored type (int16) rather than as float32; the values the
    network sees are the same. A volume smaller than the patch is windowed whole first (its padding
    is of windowed values).

    ``passed(row)``: told, after each batch, the first row along ``axis`` a later window still reads
    (the rows before it are never read again; not called for a padded volume, which is a copy).

    ``bands``: other spatial axes along which a slab is also given out in parts (:data:`Tile`), each
    once no later window touches it: then only the part of a slab the windows still reach is held,
    not the whole plane (:class:`_BandAccumulator`; the same sums, bitwise, as without them).
    """
    from monai.data.utils import compute_importance_map

    device = device or next(model.parameters()).device
    out_device = image.device
    grid = WindowGrid.of(image.shape[1:], roi_size, overlap, axis)
    if window is not None and any(grid.pad):
        image, window = window(image), None
    batch = image.unsqueeze(0)
    if any(grid.pad):
        batch = torch.nn.functional.pad(batch, list(grid.pad), mode="constant", value=0.0)
    roi = tuple(int(r) for r in roi_size)
    dtype = torch.float32 if window is not None else batch.dtype  # the windowed image's type
    weight = compute_importance_map(roi, mode=blend, sigma_scale=0.125, device=device, dtype=dtype)
    weight = weight.to(dtype=dtype, device=device)[None, None]
    weight_out = weight.to(out_device)
    acc: _Accumulator | _BandAccumulator = (_BandAccumulator(grid, bands, out_device, dtype, weight_out[0]) if bands
                                             else _Accumulator(grid, out_device, dtype, weight_out[0]))
    n = len(grid.windows)
    for first in range(0, n, sw_batch_size):
        group = range(first, min(first + sw_batch_size, n))
        cuts = [(slice(0, 1), slice(None), *grid.windows[i]) for i in group]
        if sw_batch_size > 1:
            data = torch.cat([batch[c] for c in cuts])
        else:  # MONAI hands a single window over as a view, uncopied
            data = batch[cuts[0]]
        data = (window(data) if window is not None else data).to(device)
        with autocast(amp_dtype, device):
            out = model(data)
        out *= weight
        out = out.to(out_device)
        for i, scores in zip(group, out):
            acc.add(i, scores)
            # finished after each window, not each batch: a batch that reaches into the next row of
            # windows then holds that row's scores only once this row's own slices are given out,
            # so about one patch of slices is open rather than a patch and a stride
            yield from acc.after(i)
        if passed is not None and not any(grid.pad):
            passed(grid.span(group[-1] + 1)[0] if group[-1] + 1 < n else grid.size[axis])


class _Accumulator:
    """The weighted scores of the windows still open along the sweep axis, held in
    blocks that run between consecutive window edges along it (a sweep only ever finishes at such
    an edge, so a finished block is freed whole and no open one is copied). A window adds into its
    part of each block it covers: every voxel gets the same additions in the same order as in one
    whole buffer (MONAI's), in a few tensor operations per window rather than two per slice. A
    finished run of slices is divided by its weights, cut to the volume (the padding off) and given
    out in pieces of at most ``piece_bytes``. The weights depend on the windows alone, so they are
    summed for each piece as it is given out (the same additions in the same order, so bitwise
    MONAI's), never held for the open slices: one channel of K + 1 fewer."""

    def __init__(self, grid: WindowGrid, device: torch.device, dtype: torch.dtype, weight: torch.Tensor,
                 piece_bytes: int = PIECE_BYTES):
        self.grid, self.device, self.dtype, self.piece_bytes = grid, device, dtype, piece_bytes
        self.weight = weight  # (1, *roi): one window's blending weights
        self.lo = 0  # where the open blocks start (padded coordinates along the axis)
        self.blocks: list[tuple[int, int, torch.Tensor]] = []  # start, stop, scores
        spans = {edge for window in range(len(grid.windows)) for edge in grid.span(window)}
        self.edges = sorted(spans | {0, grid.size[grid.axis]})

    def _open_until(self, stop: int, channels: int) -> None:
        """Blocks (zeros) for every edge-to-edge run between the last open block and ``stop``."""
        axis = self.grid.axis
        reached = self.blocks[-1][1] if self.blocks else self.lo
        for start, end in zip(self.edges, self.edges[1:]):
            if start >= reached and end <= stop:
                shape = [n if d != axis else end - start for d, n in enumerate(self.grid.size)]
                self.blocks.append((start, end, torch.zeros((channels, *shape), dtype=self.dtype, device=self.device)))

    def after(self, window: int) -> Iterator[Slab]:
        """The slices finished once ``window`` is added: those before the next window's start."""
        grid = self.grid
        yield from self.finish(grid.span(window + 1)[0] if window + 1 < len(grid.windows) else grid.size[grid.axis])

    def add(self, window: int, scores: torch.Tensor) -> None:
        axis = self.grid.axis
        start, stop = self.grid.span(window)
        self._open_until(stop, scores.shape[0])
        cut = list(self.grid.windows[window])
        for block_start, block_stop, block_scores in self.blocks:
            lo, hi = max(start, block_start), min(stop, block_stop)
            if hi <= lo:
                continue
            cut[axis] = slice(lo - block_start, hi - block_start)
            block_scores[(slice(None), *cut)] += scores.narrow(1 + axis, lo - start, hi - lo)

    def weights(self, start: int, stop: int) -> torch.Tensor:
        """The summed weights of the padded slices ``[start, stop)`` along the axis: every window that
        reaches them, in the order the windows were added (each voxel's sum is the one a whole
        weight buffer would hold, bitwise)."""
        axis = self.grid.axis
        shape = [n if d != axis else stop - start for d, n in enumerate(self.grid.size)]
        total = torch.zeros((1, *shape), dtype=self.dtype, device=self.device)
        for window in self.grid.windows:
            lo, hi = max(start, window[axis].start), min(stop, window[axis].stop)
            if hi <= lo:
                continue
            cut = list(window)
            cut[axis] = slice(lo - start, hi - start)
            total[(slice(None), *cut)] += self.weight.narrow(1 + axis, lo - window[axis].start, hi - lo)
        return total

    def finish(self, done: int) -> Iterator[Slab]:
        """The slices ``[lo, done)`` (padded coordinates) once no window still to come touches them,
        in the volume's coordinates."""
        axis = self.grid.axis
        off, shape = self.grid.offset, self.grid.shape
        finished = []
        while self.blocks and self.blocks[0][1] <= done:
            finished.append(self.blocks.pop(0))
        if not finished:
            return
        self.lo = finished[-1][1]
        first, last = max(finished[0][0], off[axis]), min(self.lo, off[axis] + shape[axis])
        slice_bytes = 4 * finished[0][2].shape[0] * math.prod(n for d, n in enumerate(shape) if d != axis)
        per_piece = max(1, -(-self.piece_bytes // slice_bytes))  # the fewest slices that reach piece_bytes
        cut = [slice(o, o + n) for o, n in zip(off, shape)]
        for piece_start in range(first, last, per_piece):
            piece_stop = min(piece_start + per_piece, last)
            while finished[0][1] <= piece_start:  # given out whole: freed
                finished.pop(0)
            parts = []
            weights = self.weights(piece_start, piece_stop)
            for block_start, block_stop, block_scores in finished:
                lo, hi = max(piece_start, block_start), min(piece_stop, block_stop)
                if hi <= lo:
                    continue
                cut[axis] = slice(lo - block_start, hi - block_start)
                scores = block_scores[(slice(None), *cut)]
                cut[axis] = slice(lo - piece_start, hi - piece_start)
                parts.append((scores / weights[(slice(None), *cut)]).float())
            yield (piece_start - off[axis], piece_stop - off[axis],
                   parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1 + axis))


class _BandAccumulator:
    """:class:`_Accumulator` with the slab also cut along other axes, ``bands`` (one or two): the open
    scores are held in blocks between consecutive window edges along the sweep axis and each band (whole
    along any other axis), and a block is given out as soon as the last window over it is added. A row
    of windows then finishes its blocks a column of windows (and, with a second band, a window of the
    column) at a time, so a row holds what its windows still reach and the part of the slab the next
    row will add to, rather than the whole plane a patch thick. Each voxel gets the same additions in
    the same order as :class:`_Accumulator` gives it (the windows in the same order), and the same
    weights, so the scores are bitwise the same. Finished blocks are given out as :data:`Tile` pieces:
    per block of the bands (in band order, each after the blocks before it along each band), a run of
    slices at a time (at most ``piece_bytes``), and a sweep row's tiles before the next row's."""

    def __init__(self, grid: WindowGrid, bands: Sequence[int], device: torch.device, dtype: torch.dtype,
                 weight: torch.Tensor, piece_bytes: int = PIECE_BYTES):
        if grid.axis in bands or not bands:
            raise ValueError(f"_BandAccumulator: bands {tuple(bands)} must be other axes than the sweep's ({grid.axis})")
        self.grid, self.bands, self.device, self.dtype, self.piece_bytes = grid, tuple(bands), device, dtype, piece_bytes
        self.axes = (grid.axis, *self.bands)
        self.weight = weight  # (1, *roi)
        self.edges = tuple(sorted({int(e) for w in grid.windows for e in (w[a].start, w[a].stop)} | {0, grid.size[a]})
                           for a in self.axes)
        self.covered = [self._covered(w) for w in range(len(grid.windows))]
        last: dict[tuple[int, ...], int] = {}
        for w, keys in enumerate(self.covered):
            last.update((key, w) for key in keys)
        self.closing: dict[int, list[tuple[int, ...]]] = {}  # window -> the blocks it is the last over
        for key, w in sorted(last.items()):
            self.closing.setdefault(w, []).append(key)
        self.blocks: dict[tuple[int, ...], torch.Tensor] = {}

    def _covered(self, window: int) -> list[tuple[int, ...]]:
        """The blocks (an index along the sweep axis, then along each band) a window covers."""
        cut = self.grid.windows[window]
        found = [[i for i in range(len(edges) - 1) if edges[i] >= cut[a].start and edges[i + 1] <= cut[a].stop]
                 for edges, a in zip(self.edges, self.axes)]
        return list(itertools.product(*found))

    def _span(self, key: tuple[int, ...]) -> list[tuple[int, int]]:
        """A block's ``(start, stop)`` along the sweep axis, then along each band (padded coordinates)."""
        return [(e[k], e[k + 1]) for e, k in zip(self.edges, key)]

    def add(self, window: int, scores: torch.Tensor) -> None:
        cut = list(self.grid.windows[window])
        starts = [cut[a].start for a in self.axes]
        for a in self.axes:
            cut[a] = slice(None)  # a block lies inside every window over it along these axes
        for key in self.covered[window]:
            block = self.blocks.get(key)
            spans = self._span(key)
            if block is None:
                shape = list(self.grid.size)
                for a, (lo, hi) in zip(self.axes, spans):
                    shape[a] = hi - lo
                block = self.blocks[key] = torch.zeros((scores.shape[0], *shape), dtype=self.dtype, device=self.device)
            part = scores
            for a, (lo, hi), start in zip(self.axes, spans, starts):
                part = part.narrow(1 + a, lo - start, hi - lo)
            block[(slice(None), *cut)] += part

    def weights(self, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The summed weights over ``spans`` (padded, along the sweep axis then each band; whole along the
        others), the windows in the order they were added (bitwise what :meth:`_Accumulator.weights` sums)."""
        shape = list(self.grid.size)
        for a, (lo, hi) in zip(self.axes, spans):
            shape[a] = hi - lo
        total = torch.zeros((1, *shape), dtype=self.dtype, device=self.device)
        for window in self.grid.windows:
            meet = [(max(lo, window[a].start), min(hi, window[a].stop)) for a, (lo, hi) in zip(self.axes, spans)]
            if any(hi <= lo for lo, hi in meet):
                continue
            cut, part = list(window), self.weight
            for a, (lo, _hi), (m0, m1) in zip(self.axes, spans, meet):
                cut[a] = slice(m0 - lo, m1 - lo)
                part = part.narrow(1 + a, m0 - window[a].start, m1 - m0)
            total[(slice(None), *cut)] += part
        return total

    def after(self, window: int) -> Iterator[Tile]:
        """The blocks ``window`` was the last over, per block of the bands (in band order), in pieces."""
        columns: dict[tuple[int, ...], list[int]] = {}
        for key in self.closing.get(window, []):
            columns.setdefault(key[1:], []).append(key[0])
        for column in sorted(columns):
            for run in _runs(sorted(columns[column])):
                yield from self._give(run, column)

    def _give(self, rows: list[int], column: tuple[int, ...]) -> Iterator[Tile]:
        """Blocks ``rows`` (consecutive along the sweep axis) of one block of the bands, cut to the volume,
        in pieces."""
        axis = self.grid.axis
        off, shape = self.grid.offset, self.grid.shape
        keys = [(i, *column) for i in rows]
        first_span, last_span = self._span(keys[0]), self._span(keys[-1])
        first, last = max(first_span[0][0], off[axis]), min(last_span[0][1], off[axis] + shape[axis])
        # each band cut to the volume: (padded start of the block, volume start, volume stop) in padded coordinates
        kept = [(lo, max(lo, off[a]), min(hi, off[a] + shape[a])) for a, (lo, hi) in zip(self.bands, first_span[1:])]
        cut = [slice(o, o + n) for o, n in zip(off, shape)]
        for a, (lo, c0, c1) in zip(self.bands, kept):
            cut[a] = slice(c0 - lo, c1 - lo)
        across = math.prod(max(0, c1 - c0) for _, c0, c1 in kept) * math.prod(
            n for d, n in enumerate(shape) if d not in self.axes)
        per_piece = max(1, -(-self.piece_bytes // max(1, 4 * self.blocks[keys[0]].shape[0] * across)))
        for piece_start in range(first, last if across else first, per_piece):
            piece_stop = min(piece_start + per_piece, last)
            weights = self.weights([(piece_start, piece_stop), *first_span[1:]])
            parts = []
            for key in keys:
                za, zb = self._span(key)[0]
                lo, hi = max(piece_start, za), min(piece_stop, zb)
                if hi <= lo:
                    continue
                cut[axis] = slice(lo - za, hi - za)
                scores = self.blocks[key][(slice(None), *cut)]
                cut[axis] = slice(lo - piece_start, hi - piece_start)
                parts.append((scores / weights[(slice(None), *cut)]).float())
            ranges = tuple((c0 - off[a], c1 - off[a]) for a, (_, c0, c1) in zip(self.bands, kept))
            yield (piece_start - off[axis], piece_stop - off[axis], ranges,
                   parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1 + axis))
            for key in [k for k in keys if k in self.blocks and self._span(k)[0][1] <= piece_stop]:
                del self.blocks[key]  # given out whole: freed
        for key in keys:
            self.blocks.pop(key, None)


def _runs(values: list[int]) -> list[list[int]]:
    """Sorted integers split into runs of consecutive ones."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][-1] + 1 == v:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs
