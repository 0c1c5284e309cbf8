"""Segmentation networks: MONAI's U-Net and DynUNet, registered in the one model registry."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet, UNet
from torch import nn

from medseg.config import UNetModelConfig
from medseg.engine.models import create_model, register_model
from medseg.errors import ModelError

TASK = "segmentation"


Stride = int | tuple[int, ...]


def _strides(cfg: UNetModelConfig) -> tuple[Stride, ...]:
    strides = cfg.strides or (2,) * (len(cfg.channels) - 1)
    if len(strides) != len(cfg.channels) - 1:
        raise ModelError(
            f"model.strides has {len(strides)} values but model.channels has {len(cfg.channels)} levels; "
            f"give one stride per downsampling step ({len(cfg.channels) - 1})"
        )
    return tuple(s if isinstance(s, int) else tuple(s) for s in strides)


def _per_axis(strides: Sequence[Stride], dims: int) -> list[list[int]]:
    return [[s] * dims if isinstance(s, int) else list(s) for s in strides]


def _check_divisible(patch: Sequence[int], strides: Sequence[Stride], name: str) -> None:
    factors = [1] * len(patch)
    for step in _per_axis(strides, len(patch)):
        factors = [f * s for f, s in zip(factors, step)]
    if any(p % f for p, f in zip(patch, factors)):
        shown = factors[0] if len(set(factors)) == 1 else factors
        raise ModelError(
            f"patch.size {list(patch)} must be divisible by {shown} (the product of {name} strides "
            f"{[list(s) if isinstance(s, tuple) else s for s in strides]}); "
            f"e.g. use {[max(f, round(p / f) * f) for p, f in zip(patch, factors)]}"
        )


@register_model(TASK, "unet")
def _unet(cfg: UNetModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
    strides = _strides(cfg)
    _check_divisible(patch, strides, "model")
    return UNet(
        spatial_dims=cfg.spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=cfg.channels,
        strides=strides,  # type: ignore[arg-type]  # MONAI's Convolution takes a per-axis stride too
        num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout,
    )


@register_model(TASK, "dynunet")
def _dynunet(cfg: UNetModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
    strides = _strides(cfg)
    _check_divisible(patch, strides, "model")
    dims = cfg.spatial_dims
    kernels = [list(k) for k in cfg.kernels] if cfg.kernels else [[3] * dims] * len(cfg.channels)
    if len(kernels) != len(cfg.channels):
        raise ModelError(f"model.kernels has {len(kernels)} levels but model.channels has {len(cfg.channels)}; "
                         "give one kernel per level")
    all_strides = [[1] * dims] + _per_axis(strides, dims)
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
