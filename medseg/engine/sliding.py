"""Sliding-window prediction shared by validation, evaluation and batch inference."""

from __future__ import annotations

from collections.abc import Sequence

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
