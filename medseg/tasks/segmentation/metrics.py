"""Segmentation losses and metrics.

Dice is defined once here: per class from tp/fp/fn summed over all validation cases,
background excluded, NaN where the reference and prediction are both empty. Summed counts are
what a distributed run can all-reduce, so every process count gives the same number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from monai.metrics import compute_hausdorff_distance, get_confusion_matrix
from monai.networks.utils import one_hot
from torch import nn

from medseg.tasks.segmentation.config import SegmentationLoss, SegmentationLossConfig
from medseg.tasks.segmentation.regions import Regions, region_masks, regions_target


def create_loss(cfg: SegmentationLossConfig, regions: Regions | None = None) -> nn.Module:
    """The configured loss on raw logits and integer labels of shape (B, 1, ...).

    With ``regions``, the network has one sigmoid output per region and the loss compares them
    with the region masks of the labels (:class:`RegionLoss`).
    """
    if regions is not None:
        return RegionLoss(_region_loss(cfg), regions)
    common: dict[str, Any] = {"to_onehot_y": True, "softmax": True, "include_background": True}
    if cfg.name == SegmentationLoss.DICE_CE:
        return DiceCELoss(**common, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce)
    if cfg.name == SegmentationLoss.DICE_FOCAL:
        return DiceFocalLoss(**common, lambda_dice=cfg.lambda_dice, lambda_focal=cfg.lambda_ce)
    return DiceLoss(**common)


def _region_loss(cfg: SegmentationLossConfig) -> nn.Module:
    # every channel is a region to learn: there is no background channel to leave out
    common: dict[str, Any] = {"sigmoid": True, "include_background": True}
    if cfg.name == SegmentationLoss.DICE_CE:
        return DiceBCELoss(lambda_dice=cfg.lambda_dice, lambda_bce=cfg.lambda_ce)
    if cfg.name == SegmentationLoss.DICE_FOCAL:
        # MONAI's FocalLoss is the sigmoid (binary, per channel) focal loss unless use_softmax
        return DiceFocalLoss(**common, lambda_dice=cfg.lambda_dice, lambda_focal=cfg.lambda_ce)
    return DiceLoss(**common)


class DiceBCELoss(nn.Module):
    """Soft Dice on sigmoids plus binary cross-entropy per channel (nnU-Net's ``DC_and_BCE_loss``).

    Not MONAI's ``DiceCELoss(sigmoid=True)``: with more than one channel its cross-entropy term is
    the softmax one across channels (it switches to BCE for a single channel only, MONAI #6923),
    which treats overlapping regions as competing classes.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, include_background=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target.to(logits.dtype))


class RegionLoss(nn.Module):
    """``loss(logits, region masks of label)``: the engine hands every task's loss the integer label
    batch, so the region targets are made here rather than by a transform (the cached and augmented
    label map, and the patch sampler that reads it, stay as they are)."""

    def __init__(self, loss: nn.Module, regions: Regions):
        super().__init__()
        self.loss = loss
        self.regions = regions

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, regions_target(label, self.regions))


class SegmentationMetrics:
    """Accumulates per-class tp/fp/fn (and HD95 per case) over a validation pass.

    Args:
        labels: label value -> name, background at 0.
        hd95: also compute the 95th-percentile Hausdorff distance (mm) per case and class.
        regions: also count each region (its labels' union) in the label maps, for the region Dice
            ``dice_region/<name>`` (a region model's and a softmax model's predictions alike).
    """

    def __init__(self, labels: Mapping[int, str], hd95: bool = True, regions: Regions | None = None):
        self.labels = dict(labels)
        self.names = [self.labels[i] for i in sorted(self.labels) if i != 0]
        self.hd95 = hd95
        self.regions = regions
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(len(self.names), 3, dtype=torch.float64)  # tp, fp, fn
        self.region_counts = torch.zeros(len(self.regions.names) if self.regions else 0, 3, dtype=torch.float64)
        self.hd_values: list[list[float]] = []
        self.per_case: list[dict[str, float | str]] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor, spacing: tuple[float, ...] | None = None,
               case_id: str = "") -> dict[str, float]:
        """Add one case.

        Args:
            pred: predicted label map, (*spatial) integers.
            target: reference label map, same shape.
            spacing: voxel spacing in mm for HD95.
            case_id: recorded with the per-case values.

        Returns:
            This case's per-class Dice (NaN where both are empty).
        """
        n = len(self.labels)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from reference {tuple(target.shape)}")
        pred_oh = one_hot(pred[None, None].long(), num_classes=n)
        ref_oh = one_hot(target[None, None].long(), num_classes=n)
        cm = get_confusion_matrix(pred_oh, ref_oh, include_background=False)[0]  # (C, 4): tp, fp, tn, fn
        case_counts = torch.stack([cm[:, 0], cm[:, 1], cm[:, 3]], dim=1).double().cpu()
        self.counts += case_counts
        case_dice = dice_from_counts(case_counts)
        row: dict[str, float | str] = {"case_id": case_id}
        row.update({f"dice/{name}": float(d) for name, d in zip(self.names, case_dice)})
        if self.regions is not None:
            region_counts = _mask_counts(region_masks(pred, self.regions), region_masks(target, self.regions))
            self.region_counts += region_counts
            row.update({f"dice_region/{n}": float(d) for n, d in zip(self.regions.names, dice_from_counts(region_counts))})
        if self.hd95:
            hd = compute_hausdorff_distance(pred_oh, ref_oh, include_background=False, percentile=95,
                                            spacing=list(spacing) if spacing else None)[0]
            # When only one of prediction/reference holds a class, MONAI returns no distance; dropping
            # those would reward misses, so they count as the volume's diagonal (the worst possible).
            extent = np.asarray(pred.shape, dtype=np.float64) * (np.asarray(spacing) if spacing else 1.0)
            diagonal = float(np.linalg.norm(extent))
            in_pred = pred_oh[0, 1:].flatten(1).any(1).tolist()
            in_ref = ref_oh[0, 1:].flatten(1).any(1).tolist()
            values = [diagonal if p != r else float(v) for v, p, r in zip(hd, in_pred, in_ref)]
            self.hd_values.append(values)
            row.update({f"hd95/{name}": v for name, v in zip(self.names, values)})
        self.per_case.append(row)
        return {name: float(d) for name, d in zip(self.names, case_dice)}

    def reduce(self, ctx: Any) -> None:
        """Combine the cases of every process of a distributed run into each process's totals.

        Counts are summed (float64, exact), so Dice equals the single-process value; HD95 and
        per-case rows are gathered in rank order.

        Args:
            ctx: a :class:`~medseg.engine.distributed.DistContext`.
        """
        if not ctx.enabled:
            return
        ctx.sum_(self.counts)
        ctx.sum_(self.region_counts)
        gathered = ctx.gather((self.hd_values, self.per_case))
        self.hd_values = [values for hd, _ in gathered for values in hd]
        self.per_case = [row for _, rows in gathered for row in rows]

    def aggregate(self, prefix: str = "val") -> dict[str, float]:
        """Metric name -> value: ``{prefix}/dice/<label>``, ``{prefix}/dice_mean``, ``{prefix}/hd95/<label>``,
        and with regions ``{prefix}/dice_region/<region>`` and ``{prefix}/dice_region_mean``."""
        dice = dice_from_counts(self.counts)
        out = {f"{prefix}/dice/{name}": float(d) for name, d in zip(self.names, dice)}
        finite = [float(d) for d in dice if not math.isnan(float(d))]
        out[f"{prefix}/dice_mean"] = float(np.mean(finite)) if finite else float("nan")
        if self.regions is not None:
            region_dice = dice_from_counts(self.region_counts)
            out.update({f"{prefix}/dice_region/{n}": float(d) for n, d in zip(self.regions.names, region_dice)})
            finite = [float(d) for d in region_dice if not math.isnan(float(d))]
            out[f"{prefix}/dice_region_mean"] = float(np.mean(finite)) if finite else float("nan")
        if self.hd95 and self.hd_values:
            values = np.asarray(self.hd_values, dtype=np.float64)
            for j, name in enumerate(self.names):
                column = values[:, j]
                column = column[np.isfinite(column)]
                out[f"{prefix}/hd95/{name}"] = float(column.mean()) if column.size else float("nan")
        return out


def _mask_counts(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(C, 3) tp/fp/fn of boolean (C, *spatial) masks, as float64 on the CPU."""
    flat_pred, flat_ref = pred.flatten(1), ref.flatten(1)
    tp = (flat_pred & flat_ref).sum(1)
    fp = (flat_pred & ~flat_ref).sum(1)
    fn = (~flat_pred & flat_ref).sum(1)
    return torch.stack([tp, fp, fn], dim=1).double().cpu()


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Dice per class from (C, 3) tp/fp/fn; NaN where tp + fp + fn == 0."""
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.full_like(denom, float("nan")))


def case_dice(pred: np.ndarray, truth: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Dice of each label value in ``values`` for one case's integer label maps (NaN where the label
    is in neither), by :func:`dice_from_counts`: what :meth:`SegmentationMetrics.update` returns,
    without the one-hot tensors, for scoring many variants of one prediction cheaply.

    Raises:
        ValueError: the maps' shapes differ.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from reference {tuple(truth.shape)}")
    counts = []
    for value in values:
        p, t = pred == value, truth == value
        tp = int(np.count_nonzero(p & t))
        counts.append((tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp))
    return dice_from_counts(torch.tensor(counts, dtype=torch.float64).reshape(-1, 3)).numpy()
