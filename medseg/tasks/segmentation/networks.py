"""Segmentation networks: MONAI's U-Net and DynUNet, registered in the one model registry."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet, UNet
from torch import nn

from medseg.config import UNetModelConfig
from medseg.engine.models import create_model, register_model
from medseg.errors import ModelError

TASK = "segmentation"


def _strides(cfg: UNetModelConfig) -> tuple[int, ...]:
    strides = cfg.strides or (2,) * (len(cfg.channels) - 1)
    if len(strides) != len(cfg.channels) - 1:
        raise ModelError(
            f"model.strides has {len(strides)} values but model.channels has {len(cfg.channels)} levels; "
            f"give one stride per downsampling step ({len(cfg.channels) - 1})"
        )
    return tuple(strides)


def _check_divisible(patch: Sequence[int], strides: Sequence[int], name: str) -> None:
    factor = 1
    for s in strides:
        factor *= s
    bad = [p for p in patch if p % factor]
    if bad:
        raise ModelError(
            f"patch.size {list(patch)} must be divisible by {factor} (the product of {name} strides {list(strides)}); "
            f"e.g. use {[max(factor, round(p / factor) * factor) for p in patch]}"
        )


@register_model(TASK, "unet")
def _unet(cfg: UNetModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
    strides = _strides(cfg)
    _check_divisible(patch, strides, "model")
    return UNet(
        spatial_dims=cfg.spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=cfg.channels,
        strides=strides, num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout,
    )


@register_model(TASK, "dynunet")
def _dynunet(cfg: UNetModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
    strides = _strides(cfg)
    _check_divisible(patch, strides, "model")
    dims = cfg.spatial_dims
    kernels = [[3] * dims] * len(cfg.channels)
    all_strides = [[1] * dims] + [[s] * dims for s in strides]
    return DynUNet(
        spatial_dims=dims, in_channels=in_channels, out_channels=out_channels, kernel_size=kernels,
        strides=all_strides, upsample_kernel_size=all_strides[1:], filters=list(cfg.channels), norm_name=cfg.norm,
        dropout=cfg.dropout or None, deep_supervision=False, res_block=cfg.num_res_units > 0,
    )


def create_segmentation_network(cfg: UNetModelConfig, in_channels: int, out_channels: int,
                                patch: Sequence[int]) -> nn.Module:
    """Build the segmentation network named by ``cfg.name`` for ``patch``-sized inputs.

    Raises:
        ModelError: unknown name, or an architecture the patch size does not allow.
    """
    return create_model(TASK, cfg.name, cfg, in_channels, out_channels, patch)
