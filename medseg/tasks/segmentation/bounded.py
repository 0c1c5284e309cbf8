"""Segmentation in bounded memory: the class scores of one slab at a time, never of the whole scan.

The full-buffer path (:meth:`SegmentationPredictor.predict`'s default) holds the blended scores
of every class over the whole volume, their probabilities, and those probabilities again on the
input's grid: K float32 copies of the scan several times over. Here every (member, flip) sample
sweeps its windows along one spatial axis (:func:`~medseg.engine.sliding.stream_logits`); the
samples move in step, and each slab, once no window still to come touches it, is averaged,
turned into labels and dropped. What stays is the network-grid label map (one byte a voxel), the
probabilities only where the user asked to keep them, and for a resampled model one slab of
probabilities at a time (see :mod:`medseg.tasks.segmentation.slab_resample`).

Along the first spatial axis the windows run in MONAI's order, so the labels are bitwise the
full-buffer path's (tests/tasks/test_bounded_predict.py); :func:`plan_scores` takes this path
whenever that holds and no more memory is needed than one patch-thick slab per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from medseg.engine.calibration import contract_temperature
from medseg.engine.sliding import (
    PIECE_BYTES,
    Slab,
    Tile,
    class_sigmoid,
    class_softmax,
    label_map,
    stream_logits,
)
from medseg.engine.tta import flip_combinations, flip_spatial
from medseg.engine.uncertainty import voxel_entropy
from medseg.io.heap import fix_mmap_threshold, release_pages, trim_heap

#: Bytes of one float32 value.
F32 = 4
#: The most one batch of windows' class scores may hold on a sweep that is not bitwise the full
#: buffer's anyway (another axis, or a resampling model): 100 classes of a 96x96x64 patch are 236 MB
#: a window, so the contract's batch of 4 would hold about 1 GB at once (and the runtime its copy).
BATCH_SCORES_BYTES = 256 << 20
#: Allocations from this size get pages of their own during a tiled sweep (:func:`~medseg.io.heap.fix_mmap_threshold`).
TILE_MMAP_BYTES = 1 << 20


def batch_cap(classes: int, patch: Sequence[int], sw_batch_size: int) -> int:
    """The windows a batch of an inexact sweep runs: the contract's ``sw_batch_size``, fewer where
    their ``classes`` scores would pass :data:`BATCH_SCORES_BYTES` (at least one). The exact sweep
    keeps the contract's batch: the full buffer's sums are made in its batches."""
    per_window = F32 * classes * math.prod(int(p) for p in patch)
    return max(1, min(int(sw_batch_size), BATCH_SCORES_BYTES // per_window))


@dataclass(frozen=True)
class ScoresPlan:
    """How one scan's class scores are held.

    Attributes:
        bounded: slab by slab (True) or the whole volume at once (the full-buffer path).
        axis: the spatial axis the bounded path sweeps (network grid).
        exact: the bounded path's labels are bitwise the full-buffer path's.
        full_bytes: estimated peak of the full-buffer path's scores (bytes).
        bounded_bytes: estimated peak of the bounded path's scores (bytes).
        reason: why this path, in words (for logs and ``medseg plan --explain``).
        bands: where the bounded path also cuts its slabs into tiles, the network axes it cuts
            along (an inexact sweep of one sample, :func:`tile_bands`), else empty.
    """

    bounded: bool
    axis: int
    exact: bool
    full_bytes: int
    bounded_bytes: int
    reason: str
    bands: tuple[int, ...] = ()


def tile_bands(axis: int, dims: int, exact: bool, samples: int) -> tuple[int, ...]:
    """The axes an inexact sweep of one sample also cuts its slabs along: every spatial axis but the
    swept one (the tiles' sums are the whole slabs', bitwise: the windows run in the same order). None
    for the exact sweep (the full buffer's batches are kept) and for several samples (their slabs are
    cut to common ranges, :func:`in_step`)."""
    if exact or samples != 1:
        return ()
    return tuple(a for a in range(dims) if a != axis)


def full_scores_bytes(classes: int, net_voxels: int, native_voxels: int, samples: int = 1) -> int:
    """The full-buffer path's peak for its scores (estimated): the blended logits turned into
    probabilities (and the running sum of several samples), those probabilities inverted onto the
    input's grid, and the weights: K float32 volumes on each grid, one more with several samples."""
    return F32 * ((1 + (samples > 1)) * classes * net_voxels + classes * native_voxels + net_voxels)


def bounded_scores_bytes(classes: int, net_shape: Sequence[int], patch: Sequence[int], axis: int,
                         sw_batch_size: int, overlap: float, samples: int = 1, native_plane: int = 0,
                         piece_bytes: int = PIECE_BYTES, bands: Sequence[int] = ()) -> int:
    """The bounded path's peak for its scores (estimated): per sample, the open slices (a patch
    thick: a sweep gives out a row's own slices before it adds the next row's windows) of K scores
    (the weights are summed per finished piece); one batch of windows' K scores as the network gives
    them; the finished pieces (at most ``piece_bytes`` each: one per sample, and three pieces' worth
    of averaging, labels and entropy); one byte a voxel of labels; for a resampling model, a few
    K-class slices of the input's grid (``native_plane`` voxels each). With ``bands`` (tiles, one
    sample: :func:`tile_band_bytes`) the open scores are those the windows still reach."""
    if bands:
        return tile_band_bytes(classes, net_shape, patch, axis, bands, sw_batch_size, overlap, native_plane,
                               piece_bytes)
    plane = math.prod(int(s) for i, s in enumerate(net_shape) if i != axis)
    stride = max(1, int(patch[axis] * (1 - overlap)))
    reach = min(int(net_shape[axis]), int(patch[axis]))
    piece = min(piece_bytes, F32 * classes * stride * plane)
    batch = F32 * sw_batch_size * classes * math.prod(int(p) for p in patch)
    return (F32 * samples * classes * reach * plane + batch + (samples + 3) * piece + math.prod(net_shape)
            + 4 * F32 * classes * native_plane)


def tile_band_bytes(classes: int, net_shape: Sequence[int], patch: Sequence[int], axis: int, bands: Sequence[int],
                    sw_batch_size: int, overlap: float, native_plane: int = 0, piece_bytes: int = PIECE_BYTES) -> int:
    """The tiled sweep's peak for its scores (estimated, one sample): the part of the plane the next
    row of windows adds to (the overlap of two rows, whole); for the rest of a row's thickness, the
    part of the column the next column of windows adds to (whole along a second band) and the window
    now running (one band: the whole column); one batch of windows' K scores; four pieces (the piece,
    its probabilities, their average and labels), each at least one slice of a tile; for a resampling
    model, the last slice of this row and of the row before (whole planes) and the interpolation of
    one tile of an input slice (a patch's share of ``native_plane``, a few copies); no network-grid
    labels for a resampling model (``native_plane`` > 0), one byte a voxel otherwise."""
    plane = math.prod(int(s) for i, s in enumerate(net_shape) if i != axis)

    def reach_and_overlap(a: int) -> tuple[int, int]:
        reach = min(int(net_shape[a]), int(patch[a]))
        return reach, max(0, reach - max(1, int(patch[a] * (1 - overlap))))

    reach, shared = reach_and_overlap(axis)
    width, shared_b = reach_and_overlap(bands[0])
    along = plane // max(1, int(net_shape[bands[0]]))  # the other axes of a slice, whole
    if len(bands) > 1:
        window = math.prod(min(int(net_shape[a]), int(patch[a])) for a in bands[1:])
        column = shared_b * along + (width - shared_b) * window
    else:
        column = width * along
    open_scores = F32 * classes * (shared * plane + (reach - shared) * column)
    batch = F32 * sw_batch_size * classes * math.prod(int(p) for p in patch)
    tile = width * (along if len(bands) == 1 else math.prod(min(int(net_shape[a]), int(patch[a])) for a in bands[1:]))
    piece = max(piece_bytes, F32 * classes * tile)
    resampling = (2 * F32 * classes * plane + 4 * F32 * classes * native_plane * tile // max(1, plane)
                  if native_plane else math.prod(net_shape))
    return open_scores + batch + 4 * piece + resampling


def plan_scores(contract: dict[str, Any], net_shape: Sequence[int], native_shape: Sequence[int], *,
                classes: int, samples: int, flip_axes: Sequence[Sequence[int]], overlap: float,
                available: int, mode: str = "auto", resampled: bool = False) -> ScoresPlan:
    """Choose the full-buffer or the bounded path for one scan (``mode``: auto, full or bounded).

    Auto sweeps the first axis whenever that gives the full-buffer path's labels bitwise (MONAI's
    window order; no TTA flip turns that axis round; the model does not resample) and fits in
    ``available`` bytes. Otherwise it keeps the full buffer while that fits, and past that sweeps
    the unflipped axis that needs the least memory (the same labels up to float rounding).
    """
    patch = [int(p) for p in contract["patch_size"]]
    batch = int(contract["sliding_window"]["sw_batch_size"])
    full = full_scores_bytes(classes, math.prod(net_shape), math.prod(native_shape), samples)
    flipped = {a for combo in flip_axes for a in combo}
    capped = batch_cap(classes, patch, batch)
    bands = {a: tile_bands(a, len(net_shape), a == 0 and not resampled, samples) for a in range(len(net_shape))}
    # the input slice across swept axis a (taken as the input's axis a: a reorientation that only flips)
    costs = {a: bounded_scores_bytes(classes, net_shape, patch, a, batch if a == 0 and not resampled else capped,
                                     overlap, samples,
                                     native_plane=math.prod(native_shape) // native_shape[a] if resampled else 0,
                                     bands=bands[a])
             for a in range(len(net_shape)) if a not in flipped}
    if not costs:
        return ScoresPlan(False, 0, False, full, 0, "TTA flips every axis, so no axis can be swept in one direction")
    exact = 0 in costs and not resampled
    cheapest = min(costs, key=costs.__getitem__)
    if mode == "full":
        return ScoresPlan(False, cheapest, False, full, costs[cheapest], "the full buffer was asked for")
    if exact and (mode == "bounded" or costs[0] <= available):
        return ScoresPlan(True, 0, True, full, costs[0], "slab by slab along the first axis: the full buffer's "
                          "labels in less memory")
    if mode == "bounded":
        return ScoresPlan(True, cheapest, False, full, costs[cheapest], "slab by slab was asked for", bands[cheapest])
    if full <= available:
        return ScoresPlan(False, cheapest, False, full, costs[cheapest], "the full buffer fits")
    return ScoresPlan(True, cheapest, False, full, costs[cheapest],
                      "the full buffer would not fit in the memory available: slab by slab", bands[cheapest])


def prediction_memory(shape: Sequence[int], spacing: Sequence[float], contract: dict[str, Any], *,
                      tta: bool = False, members: int = 1, available: int | None = None) -> ScoresPlan:
    """What predicting a scan of ``shape`` voxels at ``spacing`` mm needs for its class scores, both
    ways (``medseg plan --explain`` shows it for the largest scan of a dataset).

    Args:
        shape: the scan's voxels per axis (as read, before resampling).
        spacing: its voxel size in mm.
        contract: the model's contract (or a plan's equivalent: ``patch_size``, ``sliding_window``,
            ``spacing``, ``labels`` / ``regions``, ``spatial_dims``, ``tta_axes``).
        tta: with mirroring TTA.
        members: ensemble members.
        available: memory to plan against (default: what this machine has available now).
    """
    from medseg.io.preflight import available_memory

    target = contract.get("spacing")
    net_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)) if target else tuple(shape)
    classes = len(contract.get("regions") or contract.get("labels") or {}) or 2
    flips = flip_combinations(len(shape), tta, contract.get("tta_axes"))
    overlap = float(contract["sliding_window"]["overlap"])
    return plan_scores(contract, net_shape, tuple(shape), classes=classes, samples=len(flips) * members,
                       flip_axes=flips, overlap=overlap, available=available_memory() if available is None else available,
                       resampled=bool(target))


# ----------------------------------------------------------------------------------- the sweep


#: One sample's probabilities for a preprocessed (flipped) image: (member, flip) -> slabs.
SampleSweep = Callable[[tuple[nn.Module, dict[str, Any]], torch.Tensor], Iterator[Slab | Tile]]


def member_slabs(member: tuple[nn.Module, dict[str, Any]], image: torch.Tensor, *, axis: int, device: torch.device,
                 amp: torch.dtype | None, overlap: float | None, sigmoid: bool,
                 intensity: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 capped_classes: int | None = None, consumed: bool = False,
                 bands: Sequence[int] = ()) -> Iterator[Slab | Tile]:
    """One member's probabilities slab by slab: its blended logits through its temperature and
    softmax (or sigmoid for a region model), as :meth:`SegmentationPredictor.samples` makes them
    (``intensity``: a CT window the preprocessing deferred, applied to each batch of windows;
    ``capped_classes``: on an inexact sweep, the classes whose scores :func:`batch_cap` bounds a batch by;
    ``consumed``: the image is this sweep's alone and read by nothing after it, so the rows it has
    passed are handed back, :func:`row_releaser`; ``bands``: the slabs come in tiles along those axes,
    :data:`~medseg.engine.sliding.Tile`)."""
    network, contract = member
    window = contract["sliding_window"]
    batch = int(window["sw_batch_size"])
    if capped_classes is not None:
        batch = batch_cap(capped_classes, contract["patch_size"], batch)
    for piece in stream_logits(
            network, image, contract["patch_size"], overlap=overlap if overlap is not None else window["overlap"],
            sw_batch_size=batch, blend=window["blend"], device=device, amp_dtype=amp, axis=axis,
            window=intensity, passed=row_releaser(image, axis) if consumed else None, bands=bands):
        logits = piece[-1]
        probs = class_sigmoid(logits) if sigmoid else class_softmax(logits, contract_temperature(contract))
        yield (piece[0], piece[1], probs) if len(piece) == 3 else (piece[0], piece[1], piece[2], probs)


def row_releaser(image: torch.Tensor, axis: int) -> Callable[[int], None] | None:
    """For a channel-first CPU image whose rows along spatial ``axis`` are whole runs of memory (that
    axis outermost in each channel: a contiguous image and axis 0, or the permuted layout
    :class:`~medseg.data.slab_spacing.SlabSpacingd` gives a long scan), a function that hands back
    the pages of the rows before a given one (:func:`~medseg.io.heap.release_pages`): the scan held
    during a sweep shrinks as the sweep moves on, so its rows and the sweep's slabs are not both
    held whole. None where the rows are not runs of memory (another axis, a view)."""
    if image.device.type != "cpu" or image.ndim < 3:
        return None
    spatial = [int(n) for n in image.shape[1:]]
    plane = math.prod(n for d, n in enumerate(spatial) if d != axis)
    # dense, the swept axis outermost in each channel, the channels one after another
    dense = image[:1].is_contiguous() if axis == 0 else _rows_outermost(image, axis)
    if not dense or image.stride(1 + axis) != plane or (image.shape[0] > 1 and image.stride(0) != plane * spatial[axis]):
        return None
    rows = spatial[axis]
    row_bytes = plane * image.element_size()
    base = image.data_ptr()
    done = 0

    def release(upto: int) -> None:
        nonlocal done
        upto = min(int(upto), rows)
        if upto <= done:
            return
        for channel in range(int(image.shape[0])):
            release_pages(base + (channel * rows + done) * row_bytes, (upto - done) * row_bytes)
        done = upto

    return release


def _rows_outermost(image: torch.Tensor, axis: int) -> bool:
    """Whether ``image`` (channel first) is a dense permutation with spatial ``axis`` moved outermost."""
    order = [1 + axis] + [d for d in range(1, image.ndim) if d != 1 + axis]
    return image.permute(0, *order)[:1].is_contiguous()


def in_step(sweeps: Sequence[Iterator[Slab]], axis: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Slabs of several sweeps of one volume, cut to the ranges they have all finished: members with
    other patch sizes finish other ranges, so each one's pieces wait until the others catch up."""
    pending: list[list[Slab]] = [[] for _ in sweeps]
    reached = [0] * len(sweeps)
    done = 0
    live = list(sweeps)
    while True:
        for i, sweep in enumerate(live):
            while reached[i] <= done:
                piece = next(sweep, None)
                if piece is None:
                    break
                pending[i].append(piece)
                reached[i] = piece[1]
        common = min(reached)
        if common <= done:
            return
        yield done, common, [_take(p, done, common, axis) for p in pending]
        done = common


def _take(pieces: list[Slab], start: int, stop: int, axis: int) -> torch.Tensor:
    """``[start, stop)`` along ``axis`` from a sweep's pending pieces, dropping what is used up."""
    ax = 1 + axis
    parts = []
    for s, e, scores in pieces:
        lo, hi = max(s, start), min(e, stop)
        if hi > lo:
            parts.append(scores.narrow(ax, lo - s, hi - lo))
    pieces[:] = [(s, e, x) for s, e, x in pieces if e > stop]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=ax)


@dataclass
class SweepTotals:
    """What the sweep measures besides the labels: the sums behind the mean foreground entropy and
    each sample's overlap with the consensus (the agreement)."""

    entropy_fg: float = 0.0
    voxels_fg: int = 0
    entropy_all: float = 0.0
    voxels_all: int = 0
    overlaps: list[dict[int, tuple[int, int, int]]] | None = None

    def add_entropy(self, probs: torch.Tensor, consensus: torch.Tensor, sigmoid: bool) -> None:
        entropy = voxel_entropy(probs, sigmoid)
        inside = consensus != 0
        self.entropy_fg += float(entropy[inside].double().sum())
        self.voxels_fg += int(inside.sum())
        self.entropy_all += float(entropy.double().sum())
        self.voxels_all += entropy.numel()

    def add_agreement(self, labels: Sequence[torch.Tensor], consensus: torch.Tensor, foreground: Sequence[int]) -> None:
        if self.overlaps is None:
            self.overlaps = [{v: (0, 0, 0) for v in foreground} for _ in labels]
        for counts, sample in zip(self.overlaps, labels):
            for value in foreground:
                a, b = sample == value, consensus == value
                n_a, n_b, n_ab = counts[value]
                counts[value] = (n_a + int(a.sum()), n_b + int(b.sum()), n_ab + int((a & b).sum()))

    def uncertainty(self) -> dict[str, float | None]:
        """``mean_entropy`` and ``agreement`` as :func:`~medseg.engine.uncertainty.mean_foreground_entropy`
        and :func:`~medseg.engine.uncertainty.sample_agreement` define them (sums in float64)."""
        entropy = self.entropy_fg / self.voxels_fg if self.voxels_fg else self.entropy_all / max(self.voxels_all, 1)
        agreement = None
        if self.overlaps is not None and len(self.overlaps) >= 2:
            scores = []
            for counts in self.overlaps:
                per = [1.0 if n_a + n_b == 0 else 2.0 * n_ab / (n_a + n_b) for n_a, n_b, n_ab in counts.values()]
                scores.append(sum(per) / len(per) if per else 1.0)
            agreement = float(sum(scores) / len(scores))
        return {"mean_entropy": float(entropy), "agreement": agreement}


@dataclass
class SweepResult:
    """The network-grid outcome of a sweep: the consensus labels, the kept probabilities, the totals."""

    labels: torch.Tensor | None
    probabilities: torch.Tensor | None
    totals: SweepTotals


def sweep(members: Sequence[tuple[nn.Module, dict[str, Any]]], image: torch.Tensor, *, axis: int, tta: bool,
          flip_axes: Sequence[int] | None, slabs: SampleSweep, decode: Callable[[torch.Tensor], torch.Tensor],
          foreground: Sequence[int], sigmoid: bool, keep_probabilities: bool,
          on_slab: Callable[..., None] | None = None, bands: Sequence[int] = (),
          keep_labels: bool = True) -> SweepResult:
    """Every (member, flip) sample of ``image`` in step along ``axis``: per slab the samples'
    mean (summed in :func:`~medseg.engine.tta.predict_samples`' order), its labels (``decode``),
    the uncertainty sums, and ``on_slab(start, stop, mean)`` for whoever resamples it. With ``bands``
    (one sample only: in-step cutting needs whole slabs) the slabs come in tiles along those axes and
    ``on_slab`` also gets each tile's ``(start, stop)`` along them; ``keep_labels``: False where only
    ``on_slab`` needs them (a resampling model's labels are made on the input's grid)."""
    dims = image.ndim - 1
    combos = flip_combinations(dims, tta, flip_axes)
    if any(axis in combo for combo in combos):
        raise ValueError(f"sweep: axis {axis} is flipped by TTA; sweep an axis no flip turns round")
    runs = [(m, combo) for m in members for combo in combos]
    if bands and len(runs) != 1:
        raise ValueError(f"sweep: tiles along axes {tuple(bands)} need one sample, got {len(runs)} (members x flips)")
    trim_heap()  # what reading and preprocessing freed, handed back before the open slices are allocated
    if bands:  # tiles come and go in many sizes of a few MiB: pages of their own, not a fragmented heap
        fix_mmap_threshold(TILE_MMAP_BYTES)
    streams = [slabs(m, flip_spatial(image, combo, dims)) for m, combo in runs]
    spatial = tuple(image.shape[1:])
    # every slab is written: its pages are touched only then
    labels = torch.empty(spatial, dtype=torch.uint8) if keep_labels else None
    kept: torch.Tensor | None = None
    totals = SweepTotals()
    pieces = ((s, e, None, o) for s, e, o in in_step(cast(list[Iterator[Slab]], streams), axis)) if not bands \
        else ((s, e, r, [x]) for s, e, r, x in cast(Iterator[Tile], streams[0]))
    for start, stop, ranges, outs in pieces:
        outs = [flip_spatial(o, combo, dims) for o, (_, combo) in zip(outs, runs)]
        sample_labels = [decode(o) for o in outs] if len(outs) > 1 else []
        total = outs[0]
        for out in outs[1:]:
            total = total.add_(out)
        mean = total.div_(len(outs))
        consensus = decode(mean)
        totals.add_entropy(mean, consensus, sigmoid)
        if sample_labels:
            totals.add_agreement(sample_labels, consensus, foreground)
        region = [(axis, start, stop), *((b, lo, hi) for b, (lo, hi) in zip(bands, ranges or ()))]
        if labels is not None:
            _part(labels, region).copy_(consensus)
        if keep_probabilities:
            if kept is None:
                kept = torch.empty((mean.shape[0], *spatial), dtype=torch.float32)
            _part(kept, region, 1).copy_(mean)
        if on_slab is not None:
            if ranges is None:
                on_slab(start, stop, mean)
            else:
                on_slab(start, stop, mean, ranges)
        trim_heap()  # a slab's temporaries are small enough for glibc's heap, which would otherwise keep them
    return SweepResult(labels, kept, totals)


def _part(volume: torch.Tensor, region: Sequence[tuple[int, int, int]], channels: int = 0) -> torch.Tensor:
    """The view of ``volume`` over ``(axis, start, stop)`` ranges of its spatial axes."""
    for axis, start, stop in region:
        volume = volume.narrow(channels + axis, start, stop - start)
    return volume


def argmax_labels(scores: torch.Tensor) -> torch.Tensor:
    """:func:`~medseg.engine.sliding.label_map` (one sample's labels, as the spread keeps them)."""
    return label_map(scores)


def label_dtype(names: dict[int, str]) -> type:
    return np.uint8 if max(names) < 256 else np.uint16
