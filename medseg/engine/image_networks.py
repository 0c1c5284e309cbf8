"""Whole-image networks, 2D and 3D, for every task that reads one answer off a whole image: the
course's line from the perceptron (``mlp`` without hidden layers) and its heirs (MLP, LeNet)
through AlexNet, VGG and GoogLeNet (:mod:`medseg.engine.classic_networks`) to MONAI's ResNet and DenseNet.

One table (:data:`IMAGE_NETWORKS`); a task puts all of it into the model registry under its own
name with :func:`register_image_networks` (classification's heads give class logits, regression's
the targets), so tasks share the networks without importing each other. Every factory takes
``(cfg, in_channels, num_outputs, input_size)`` and returns ``(B, num_outputs)``; activation,
dropout, norm, width and stem are config choices (:class:`~medseg.config.image_model.ImageModelConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from monai.networks.layers.factories import Act, Conv, Pool
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import DenseNet121, ResNet
from torch import nn

from medseg.config.image_model import ImageModelConfig, Stem
from medseg.engine.classic_networks import VGG, VGG_LAYERS, AlexNet, GoogLeNet
from medseg.engine.models import register_model
from medseg.errors import ModelError

ImageNetworkFactory = Callable[[ImageModelConfig, int, int, Sequence[int]], nn.Module]
#: ``model.name`` -> factory: every whole-image network.
IMAGE_NETWORKS: dict[str, ImageNetworkFactory] = {}


def register_image_networks(task: str) -> None:
    """Register every whole-image network as ``(task, name)`` in the model registry."""
    for name, factory in IMAGE_NETWORKS.items():
        register_model(task, name)(factory)


def _image_network(name: str) -> Callable[[ImageNetworkFactory], ImageNetworkFactory]:
    def add(factory: ImageNetworkFactory) -> ImageNetworkFactory:
        IMAGE_NETWORKS[name] = factory
        return factory

    return add


def activation(cfg: ImageModelConfig) -> nn.Module:
    """A fresh activation layer of the configured kind (MONAI's ``Act`` factory)."""
    name = str(cfg.activation)
    return Act[name](inplace=True) if name in ("relu", "leakyrelu", "elu") else Act[name]()


def _act_arg(cfg: ImageModelConfig) -> str | tuple:
    name = str(cfg.activation)
    return (name, {"inplace": True}) if name in ("relu", "leakyrelu", "elu") else name


def _norm_arg(cfg: ImageModelConfig) -> str | tuple:
    # MONAI's ResNet initialises norm weights, which a non-affine instance norm does not have
    return ("instance", {"affine": True}) if cfg.norm == "instance" else cfg.norm


def _head(features: int, outputs: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, outputs)) if dropout else nn.Linear(features, outputs)


@_image_network("mlp")
def _mlp(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    """Flattened voxels -> hidden layers (``model.channels``) -> outputs: the background material's start."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * math.prod(size)
    for hidden in cfg.channels:
        layers += [nn.Linear(width, hidden), activation(cfg)]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 style: (conv 5, act, max pool 2) per stage, then 120 and 84 hidden units."""

    def __init__(self, cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]):
        super().__init__()
        dims = cfg.spatial_dims
        stages: list[nn.Module] = []
        channels, spatial = in_channels, list(size)
        for features in cfg.channels:
            stages += [Conv[Conv.CONV, dims](channels, features, kernel_size=5, padding=2), activation(cfg),
                       Pool[Pool.MAX, dims](kernel_size=2)]
            channels, spatial = features, [s // 2 for s in spatial]
        if min(spatial) < 1:
            raise ModelError(f"lenet: input size {list(size)} is too small for {len(cfg.channels)} pooling stages "
                             f"(model.channels {list(cfg.channels)}); use fewer stages or a larger input size")
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * math.prod(spatial), 120), activation(cfg), nn.Linear(120, 84),
            activation(cfg), _head(84, outputs, cfg.dropout))

    def forward(self, x):  # noqa: ANN001, ANN201 - nn.Module signature
        return self.classifier(self.features(x))


@_image_network("lenet")
def _lenet(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    return LeNet(cfg, in_channels, outputs, size)


_RESNETS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
            "resnet50": ("bottleneck", [3, 4, 6, 3])}
_STEMS = {Stem.SMALL: (3, 1, True), Stem.STRIDED: (3, 2, True), Stem.IMAGENET: (7, 2, False)}


def _resnet(depth: str) -> ImageNetworkFactory:
    block, layers = _RESNETS[depth]

    def build(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
        kernel, stride, no_pool = _STEMS[cfg.stem]
        net = ResNet(block, layers, [64, 128, 256, 512], spatial_dims=cfg.spatial_dims, n_input_channels=in_channels,
                     conv1_t_size=kernel, conv1_t_stride=stride, no_max_pool=no_pool, widen_factor=cfg.widen_factor,
                     num_classes=outputs, act=_act_arg(cfg), norm=_norm_arg(cfg))
        if cfg.dropout and isinstance(net.fc, nn.Linear):  # always a Linear: num_classes is given
            # add_module swaps the child in place; MONAI types ``fc`` as ``Linear | None``, not any head
            net.add_module("fc", _head(net.fc.in_features, outputs, cfg.dropout))
        return net

    return build


for _name in _RESNETS:
    _image_network(_name)(_resnet(_name))


@_image_network("densenet121")
def _densenet121(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    net = DenseNet121(spatial_dims=cfg.spatial_dims, in_channels=in_channels, out_channels=outputs,
                      act=_act_arg(cfg), norm=_norm_arg(cfg), dropout_prob=cfg.dropout)
    if cfg.stem != Stem.IMAGENET:  # MONAI's stem divides by 4 before the first block; small inputs cannot afford it
        kernel, stride, _ = _STEMS[cfg.stem]
        # torch types a child looked up by attribute as ``Tensor | Module``; MONAI's DenseNet makes conv0 a conv
        conv0 = cast(nn.modules.conv._ConvNd, net.features.conv0)
        net.features.conv0 = Conv[Conv.CONV, cfg.spatial_dims](in_channels, conv0.out_channels, kernel_size=kernel,
                                                               stride=stride, padding=kernel // 2, bias=False)
        net.features.pool0 = nn.Identity()
    return net


def _scale(cfg: ImageModelConfig) -> Callable[[int], int]:
    return lambda width: max(1, round(width * cfg.widen_factor))


def _head_grid(cfg: ImageModelConfig, paper: int) -> int:
    # 7^3 cells of 512 VGG features would feed a 719M-parameter layer: 3D pools to 2^3 unless told
    return cfg.head_grid or (paper if cfg.spatial_dims == 2 else 2)


@_image_network("alexnet")
def _alexnet(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    scale = _scale(cfg)
    return AlexNet(cfg.spatial_dims, in_channels, outputs, size, [scale(w) for w in (96, 256, 384, 384, 256)],
                   hidden=scale(4096), grid=_head_grid(cfg, 6), large_stem=cfg.stem == Stem.IMAGENET,
                   stem_stride=2 if cfg.stem == Stem.STRIDED else 1, lrn=cfg.local_response_norm,
                   dropout=cfg.dropout, act=lambda: activation(cfg))


def _vgg(layers: str, norm: bool) -> ImageNetworkFactory:
    def build(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
        scale = _scale(cfg)
        widths = [w if isinstance(w, str) else scale(w) for w in VGG_LAYERS[layers]]

        def norm_layer(channels: int) -> nn.Module:
            return get_norm_layer(name=_norm_arg(cfg), spatial_dims=cfg.spatial_dims, channels=channels)

        return VGG(cfg.spatial_dims, in_channels, outputs, size, widths, hidden=scale(4096), grid=_head_grid(cfg, 7),
                   norm=norm_layer if norm else None, dropout=cfg.dropout, act=lambda: activation(cfg))

    return build


for _name in VGG_LAYERS:
    _image_network(_name)(_vgg(_name, norm=False))
    _image_network(f"{_name}_bn")(_vgg(_name, norm=True))


@_image_network("googlenet")
def _googlenet(cfg: ImageModelConfig, in_channels: int, outputs: int, size: Sequence[int]) -> nn.Module:
    return GoogLeNet(cfg.spatial_dims, in_channels, outputs, size, _scale(cfg), large_stem=cfg.stem == Stem.IMAGENET,
                     stem_stride=2 if cfg.stem == Stem.STRIDED else 1, lrn=cfg.local_response_norm,
                     dropout=cfg.dropout, aux_classifiers=cfg.aux_classifiers,
                     aux_grid=4 if cfg.spatial_dims == 2 else 2, act=lambda: activation(cfg))


class AuxiliaryLoss(nn.Module):
    """``loss`` of the logits plus ``weight`` x ``loss`` of each auxiliary head's, for a network
    that returns ``(logits, *aux_logits)`` in training mode (GoogLeNet with ``aux_classifiers``:
    0.3, the paper's weight); a plain tensor is scored by ``loss`` alone."""

    def __init__(self, loss: nn.Module, weight: float = 0.3):
        super().__init__()
        self.loss, self.weight = loss, weight

    def forward(self, output: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return self.loss(output, target)
        main, *side = output
        return self.loss(main, target) + self.weight * sum((self.loss(aux, target) for aux in side),
                                                           torch.zeros((), device=main.device))


def with_auxiliary_heads(loss: nn.Module, cfg: ImageModelConfig) -> nn.Module:
    """``loss`` as the training loss of ``cfg``'s network: wrapped in :class:`AuxiliaryLoss` when it has side heads."""
    return AuxiliaryLoss(loss) if cfg.aux_classifiers else loss


def head_prefix(model: nn.Module) -> str:
    """Name of the network's head: its last linear layer (``fc``, ``class_layers.out``, ...)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ModelError(f"{type(model).__name__} has no linear layer to treat as the head")
    return linear[-1]
