"""Sliding-window prediction shared by validation, evaluation and batch inference."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
#: The most a finished piece of a sweep holds (bytes): a finished run of slices is given out in
#: pieces of this size, so the work done on each (averaging, labels, entropy) stays this small.
PIECE_BYTES = 32 << 20


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
                  amp_dtype: torch.dtype | None = None, axis: int = 0) -> Iterator[Slab]:
    """:func:`predict_logits` one slab at a time along spatial ``axis``: each slab is given out as
    soon as no later window touches it, so only about one patch's thickness of the volume's scores
    is held at once.

    The windows, their batches, the Gaussian weights and every addition are MONAI's, in MONAI's
    order along ``axis`` 0; there every slab is bitwise what :func:`predict_logits` gives for it
    (tests/engine/test_sliding.py). Along another axis the windows run in another order, so the
    float sums agree only to rounding.
    """
    from monai.data.utils import compute_importance_map

    device = device or next(model.parameters()).device
    out_device = image.device
    grid = WindowGrid.of(image.shape[1:], roi_size, overlap, axis)
    batch = image.unsqueeze(0)
    if any(grid.pad):
        batch = torch.nn.functional.pad(batch, list(grid.pad), mode="constant", value=0.0)
    roi = tuple(int(r) for r in roi_size)
    weight = compute_importance_map(roi, mode=blend, sigma_scale=0.125, device=device, dtype=batch.dtype)
    weight = weight.to(dtype=batch.dtype, device=device)[None, None]
    weight_out = weight.to(out_device)
    acc = _Accumulator(grid, out_device, batch.dtype)
    n = len(grid.windows)
    for first in range(0, n, sw_batch_size):
        group = range(first, min(first + sw_batch_size, n))
        cuts = [(slice(0, 1), slice(None), *grid.windows[i]) for i in group]
        if sw_batch_size > 1:
            data = torch.cat([batch[c] for c in cuts]).to(device)
        else:  # MONAI hands a single window over as a view, uncopied
            data = batch[cuts[0]].to(device)
        with autocast(amp_dtype, device):
            out = model(data)
        out *= weight
        out = out.to(out_device)
        for i, scores in zip(group, out):
            acc.add(i, scores, weight_out[0])
        done = grid.span(group[-1] + 1)[0] if group[-1] + 1 < n else grid.size[axis]
        yield from acc.finish(done)


class _Accumulator:
    """The weighted scores and weights of the windows still open along the sweep axis, one tensor
    per slice of ``[lo, hi)`` (so a finished slice is freed without copying the others): a window
    adds into each slice it covers; a finished run of slices is divided by its weights, cut to the
    volume (the padding off) and given out in pieces of at most ``piece_bytes``."""

    def __init__(self, grid: WindowGrid, device: torch.device, dtype: torch.dtype, piece_bytes: int = PIECE_BYTES):
        self.grid, self.device, self.dtype, self.piece_bytes = grid, device, dtype, piece_bytes
        self.lo = 0
        self.scores: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.plane = tuple(n for d, n in enumerate(grid.size) if d != grid.axis)

    def add(self, window: int, scores: torch.Tensor, weight: torch.Tensor) -> None:
        axis = self.grid.axis
        start, stop = self.grid.span(window)
        while self.lo + len(self.scores) < stop:
            self.scores.append(torch.zeros((scores.shape[0], *self.plane), dtype=self.dtype, device=self.device))
            self.weights.append(torch.zeros((1, *self.plane), dtype=self.dtype, device=self.device))
        cut = (slice(None), *(s for d, s in enumerate(self.grid.windows[window]) if d != axis))
        for i in range(start, stop):
            self.scores[i - self.lo][cut] += scores.select(1 + axis, i - start)
            self.weights[i - self.lo][cut] += weight.select(1 + axis, i - start)

    def finish(self, done: int) -> Iterator[Slab]:
        """The slices ``[lo, done)`` (padded coordinates) once no window still to come touches them,
        in the volume's coordinates."""
        axis = self.grid.axis
        off, shape = self.grid.offset, self.grid.shape
        plane_cut = (slice(None), *(slice(o, o + n) for d, (o, n) in enumerate(zip(off, shape)) if d != axis))
        finished = min(done - self.lo, len(self.scores))
        run: list[torch.Tensor] = []
        first = 0
        for i in range(self.lo, self.lo + finished):
            scores, weights = self.scores.pop(0), self.weights.pop(0)
            if not off[axis] <= i < off[axis] + shape[axis]:
                continue
            if not run:
                first = i - off[axis]
            run.append((scores / weights)[plane_cut].float())
            if sum(x.numel() for x in run) * 4 >= self.piece_bytes:
                yield first, first + len(run), torch.stack(run, dim=1 + axis)
                run = []
        if run:
            yield first, first + len(run), torch.stack(run, dim=1 + axis)
        self.lo += finished
