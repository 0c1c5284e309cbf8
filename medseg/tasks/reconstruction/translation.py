"""Image-to-image translation: one contrast synthesised from the others of the same case.

The pieces the reconstruction engine runs for ``recon.problem: translation``:

* a 2D MONAI ``UNet`` from the input contrasts (channels) of a slice to the target contrast,
  every contrast scaled to [0, 1] per volume (min-max), trained with L1 + SSIM (MONAI's ``SSIMLoss``);
* inference slice by slice through MONAI's ``sliding_window_inference`` on the input grid, averaged
  over in-plane flips (medseg's one TTA convention, :mod:`medseg.engine.tta`); the spread of the
  flips per voxel is the uncertainty map;
* the classical baseline: the histogram of one input matched to the training targets' histogram
  (scikit-image's ``match_histograms`` against stored quantiles), exact for a monotone contrast
  map with the same distribution;
* MONAI's PSNR, SSIM and MAE per volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.apps.reconstruction.networks.nets.utils import divisible_pad_t, inverse_divisible_pad_t
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric
from monai.networks.nets import UNet
from torch import nn

from medseg.config import UNetModelConfig
from medseg.engine.tta import predict_samples
from medseg.errors import ModelError
from medseg.tasks.reconstruction.slice_window import slice_window

#: The name of the baseline in metric names and output files.
BASELINE = "histmatch"
#: Quantiles of the training targets kept for histogram matching (stored in the model's contract).
QUANTILE_LEVELS = 1001
#: SSIM's window on 2D slices (scikit-image's and fastMRI's 7x7).
SSIM_WINDOW = 7
METRICS = ("psnr", "ssim", "mae")


class TranslationUNet(nn.Module):
    """MONAI's 2D ``UNet`` from ``in_channels`` contrasts to one, padded to a size its strides divide."""

    def __init__(self, cfg: UNetModelConfig, in_channels: int):
        super().__init__()
        given = tuple(cfg.strides or (2,) * (len(cfg.channels) - 1))
        strides = tuple(s for s in given if isinstance(s, int))
        if len(strides) != len(given):
            raise ModelError(f"model.strides {list(given)}: translation U-Nets take one stride per level (an int "
                             "for both axes of a slice), not one per axis")
        self.factor = math.prod(strides)
        self.unet = UNet(spatial_dims=2, in_channels=in_channels, out_channels=1, channels=cfg.channels,
                         strides=strides, num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, pads = divisible_pad_t(x, k=self.factor)
        return inverse_divisible_pad_t(self.unet(padded), pads)


@dataclass(frozen=True)
class Translation:
    """The synthesised slices (S, 1, H, W) of one volume and the spread (standard deviation) of the
    flips per voxel (zero without TTA)."""

    output: torch.Tensor
    spread: torch.Tensor


@torch.no_grad()
def translate_volume(net: nn.Module, inputs: torch.Tensor, roi: Sequence[int], device: torch.device,
                     amp_dtype: torch.dtype | None, tta: bool, axes: Sequence[int] | None = None,
                     batch_size: int = 16) -> Translation:
    """Synthesise the target contrast of a volume from its input contrasts.

    Args:
        net: the translation network (eval mode is set here).
        inputs: (C, H, W, S) input contrasts in [0, 1], slices along the last axis.
        roi: the network's training slice size: the sliding window's size.
        tta: average over in-plane flips (``axes``, default both) and keep their spread.
    """
    net.eval()
    slices = inputs.float().permute(3, 0, 1, 2)  # (S, C, H, W)

    window = slice_window(roi, batch_size, amp_dtype, device)

    outputs, spreads = [], []
    for start in range(0, len(slices), batch_size):
        samples = predict_samples([net], slices[start:start + batch_size].to(device), 2, tta, window,
                                  keep_spread=True, class_axis=1, axes=axes, decode=lambda out: out[:0])
        outputs.append(samples.mean.cpu())
        variance = samples.variance if samples.variance is not None else torch.zeros_like(samples.mean[:, 0])
        spreads.append(variance.sqrt()[:, None].cpu())
    return Translation(torch.cat(outputs), torch.cat(spreads))


def target_quantiles(volumes: Sequence[np.ndarray | torch.Tensor]) -> list[float]:
    """``QUANTILE_LEVELS`` evenly spaced quantiles of every voxel of ``volumes`` pooled: the
    reference histogram the baseline matches to (what a model stores of its training targets)."""
    pooled = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in volumes])
    return [float(q) for q in np.quantile(pooled, np.linspace(0.0, 1.0, QUANTILE_LEVELS))]


def histogram_matched(source: np.ndarray | torch.Tensor, reference_quantiles: Sequence[float]) -> np.ndarray:
    """``source`` with its histogram matched to the one ``reference_quantiles`` describe
    (scikit-image's ``match_histograms``: a monotone map, so a monotone contrast change of a
    volume with the reference's distribution is undone exactly)."""
    from skimage.exposure import match_histograms

    image = np.asarray(source, dtype=np.float64)
    reference = np.asarray(reference_quantiles, dtype=np.float64).reshape((-1,) + (1,) * (image.ndim - 1))
    return match_histograms(image, reference).astype(np.float32)


def volume_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MONAI's PSNR and MAE over the whole volume and SSIM averaged over its slices, for slices
    (S, 1, H, W) of images scaled to [0, 1] (data range 1)."""
    pred, target = pred.double(), target.double()
    volume_pred, volume_target = pred.permute(1, 2, 3, 0)[None], target.permute(1, 2, 3, 0)[None]
    psnr = float(torch.as_tensor(PSNRMetric(max_val=1.0)(volume_pred, volume_target)).mean())
    mae = float(torch.as_tensor(MAEMetric()(volume_pred, volume_target)).mean())
    win = min(SSIM_WINDOW, *pred.shape[-2:])
    win -= 1 - win % 2  # an odd window that fits the slice
    ssim = float(torch.as_tensor(SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="uniform", win_size=win)(pred, target)).mean())
    return {"psnr": psnr, "ssim": ssim, "mae": mae}


def trust_threshold(spread: np.ndarray, error: np.ndarray, tolerance: float | None, coverage: float) -> float:
    """The trusted mask's threshold, chosen on validation voxels: with an error budget
    ``tolerance``, the largest spread ``t`` for which the voxels with spread at most ``t`` have a
    mean absolute error of at most ``tolerance`` (0 when even the surest voxel misses it);
    without, the ``coverage`` quantile of the spreads (that share of voxels is trusted)."""
    if tolerance is None:
        return float(np.quantile(spread, coverage))
    order = np.argsort(spread.ravel(), kind="stable")
    running = np.cumsum(error.ravel()[order], dtype=np.float64) / np.arange(1, order.size + 1)
    within = np.flatnonzero(running <= tolerance)
    return float(spread.ravel()[order][within[-1]]) if within.size else 0.0


def trusted_scores(spread: np.ndarray, error: np.ndarray, threshold: float) -> dict[str, float]:
    """The share of voxels the threshold trusts and the mean absolute error inside and outside them."""
    trusted = spread <= threshold
    inside, outside = error[trusted], error[~trusted]
    return {"trusted_fraction": float(trusted.mean()),
            "trusted_mae": float(inside.mean()) if inside.size else float("nan"),
            "untrusted_mae": float(outside.mean()) if outside.size else float("nan")}


__all__ = ["BASELINE", "METRICS", "Translation", "TranslationUNet", "histogram_matched", "target_quantiles",
           "translate_volume", "trust_threshold", "trusted_scores", "volume_scores"]
