"""Explicit registry of segmentation networks, each a thin factory over a MONAI network."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from monai.networks.nets import DynUNet, UNet
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ModelError

ModelFactory = Callable[[ModelConfig, int, int, Sequence[int]], nn.Module]
MODEL_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def add(factory: ModelFactory) -> ModelFactory:
        MODEL_REGISTRY[name] = factory
        return factory

    return add


def _strides(cfg: ModelConfig) -> tuple[int, ...]:
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


@register_model("unet")
def _unet(cfg: ModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
    strides = _strides(cfg)
    _check_divisible(patch, strides, "model")
    return UNet(
        spatial_dims=cfg.spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=cfg.channels,
        strides=strides, num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout,
    )


@register_model("dynunet")
def _dynunet(cfg: ModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
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


def create_model(cfg: ModelConfig, in_channels: int, out_channels: int, patch: Sequence[int]) -> nn.Module:
    """Build the network named by ``cfg.name``.

    Raises:
        ModelError: unknown name (with the closest registered one), or strides that do not fit the patch.
    """
    factory = MODEL_REGISTRY.get(cfg.name)
    if factory is None:
        hint = difflib.get_close_matches(cfg.name, MODEL_REGISTRY, n=1)
        raise ModelError(
            f"model.name {cfg.name!r} is not registered{f'; did you mean {hint[0]!r}?' if hint else ''} "
            f"Registered: {sorted(MODEL_REGISTRY)}"
        )
    return factory(cfg, in_channels, out_channels, patch)
